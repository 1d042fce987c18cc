"""The linear-probe model: a linear classifier on frozen BEiT features (arXiv 2106.08254, appendix).

Features are the average-pooled patch tokens after the first ``num_blocks`` blocks (no final norm), normalised
without affine parameters (BatchNorm as in MAE's probe, or LayerNorm), then one linear layer. Only ``norm`` and
``head`` have parameters that train; the backbone is cut with timm's own ``Beit.prune_intermediate_layers`` and
run with ``Beit.forward_intermediates``, so gradient checkpointing (``backbone.set_grad_checkpointing``) applies.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

__all__ = ["LinearProbe", "average_norm_stats"]


class LinearProbe(nn.Module):
    """Frozen BEiT blocks ``[0, num_blocks)`` -> mean of the patch tokens -> norm without affine -> linear head.

    Args:
        backbone: a timm ``Beit`` (e.g. from :func:`beit_scale.models.build_classifier`); pruned in place: the
            blocks after ``num_blocks``, the final ``norm``, ``fc_norm`` and ``head`` are removed.
        num_blocks: features are taken after this many blocks (1-based), in ``[1, len(backbone.blocks)]``.
        num_classes: outputs of the linear head.
        norm: ``"batchnorm"`` or ``"layernorm"``, both without affine parameters.
    """

    def __init__(self, backbone: Beit, num_blocks: int, num_classes: int, norm: str = "batchnorm"):
        super().__init__()
        depth = len(backbone.blocks)
        if not 1 <= num_blocks <= depth:
            raise ValueError(f"num_blocks={num_blocks} must be in [1, {depth}] blocks of the backbone")
        if norm not in ("batchnorm", "layernorm"):
            raise ValueError(f"norm={norm!r} must be 'batchnorm' or 'layernorm'")
        self.take = num_blocks - 1  # 0-based index of the last block kept
        backbone.prune_intermediate_layers(indices=[self.take], prune_norm=True, prune_head=True)
        self.backbone = backbone.requires_grad_(False).eval()
        dim = backbone.embed_dim
        self.norm = (nn.BatchNorm1d(dim, affine=False, eps=1e-6) if norm == "batchnorm"
                     else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()  # no drop path, ever
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) mean of the patch tokens (the [CLS] token excluded) after the kept blocks."""
        (tokens,) = self.backbone.forward_intermediates(images, indices=[self.take], output_fmt="NLC",
                                                        intermediates_only=True, stop_early=True)  # (B, N, D)
        return tokens.mean(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(images)))  # (B, num_classes)


def average_norm_stats(probe: nn.Module) -> None:
    """Average the BatchNorm running statistics over ranks (buffers are never partitioned, even at ZeRO-3).

    A no-op without an initialised process group, with a single rank, or for the LayerNorm probe (no buffers).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buf in probe.norm.buffers():
        if buf.is_floating_point():
            total = buf.detach().float()
            dist.all_reduce(total)
            buf.copy_(total / dist.get_world_size())
