"""BEiT for masked image modeling, built on timm's ``Beit`` (its blocks, patch embedding and init)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn
from torch.utils.checkpoint import checkpoint

from beit_scale.models.zoo import BeitSpec


class BeitMIM(Beit):
    """timm's ``Beit`` with the learned [M] embedding and a linear head on the masked patches.

    The head (``masking.target``) is ``lm_head``, logits over the visual vocabulary (``target='tokens'``, BEiT), or
    ``pixel_head``, the ``patch_size**2 * 3`` pixels of the patch (``target='pixels'``, the paper's "recover masked
    pixels" ablation). The names differ so that one never loads into the other silently.

    The backbone keeps timm's parameter names, so its state dict maps onto ``timm.create_model('beit_*')``
    (shared relative position bias, no absolute position embedding, as in BEiT pretraining).
    timm applies the paper's init: trunc-normal(0.02) and attention/MLP output projections of block l
    divided by sqrt(2 l).
    """

    def __init__(
        self,
        spec: BeitSpec,
        vocab_size: int,
        img_size: Optional[int] = None,
        drop_path: float = 0.1,
        layer_scale: Optional[float] = None,
        target: Literal["tokens", "pixels"] = "tokens",
    ):
        super().__init__(
            img_size=img_size or spec.img_size,
            patch_size=spec.patch_size,
            num_classes=0,
            global_pool="",  # keep the final norm on the tokens; MIM pools nothing
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=spec.mlp_ratio,
            drop_path_rate=drop_path,
            init_values=spec.layer_scale if layer_scale is None else layer_scale,
            use_abs_pos_emb=False,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
        )
        if target not in ("tokens", "pixels"):
            raise ValueError(f"masking.target={target!r} must be 'tokens' or 'pixels'")
        self.target = target
        self.vocab_size = vocab_size if target == "tokens" else 0  # pixels: no vocabulary
        self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        if target == "tokens":
            self.lm_head = nn.Linear(spec.embed_dim, vocab_size)
        else:
            self.pixel_head = nn.Linear(spec.embed_dim, spec.patch_size ** 2 * 3)
        head = self.lm_head if target == "tokens" else self.pixel_head
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def forward(self, images: torch.Tensor, mask: torch.Tensor, masked_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over the vocabulary (``target='tokens'``) or pixels (``'pixels'``) of the masked patches.

        Args:
            images: (B, 3, H, W) patch view.
            mask: (B, N) bool, True where the patch is replaced by [M].
            masked_idx: (num_masked_total,) flat indices of ``mask``'s True entries in row-major order. Pass it
                (computed on the CPU, see :func:`masked_positions`) to avoid a device-to-host sync.

        Returns:
            (num_masked_total, vocab_size) logits, or (num_masked_total, patch_size**2 * 3) pixels in the order of
            :func:`patchify`, in the row-major order of ``mask.nonzero()``.
        """
        x = self.patch_embed(images)  # (B, N, D)
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)  # (B, 1+N, D)
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias()  # (heads, 1+N, 1+N), shared by all blocks
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                # Non-reentrant; positional bias argument works with every ZeRO stage.
                x = checkpoint(blk, x, rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        x = self.norm(x)
        if masked_idx is None:
            masked_idx = masked_positions(mask)  # syncs on a GPU
        x = x[:, 1:].reshape(-1, x.shape[-1]).index_select(0, masked_idx)  # (num_masked_total, D)
        if self.target == "pixels":
            return self.pixel_head(x)  # (num_masked_total, p*p*3)
        return self.lm_head(x)  # (num_masked_total, vocab)


def masked_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat row-major indices of the True entries of a (B, N) mask; cheap on the CPU, a host sync on a GPU."""
    return mask.flatten().nonzero().squeeze(1)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) images as (B, N, patch_size**2 * 3) patches: row-major over the grid, each patch's pixels
    row-major with the channels last (MAE's ``patchify``), the order ``pixel_head`` predicts."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, gh * gw, patch_size ** 2 * c)


def normalized_patch_pixels(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """The pixel target: each patch of :func:`patchify` minus its mean, over sqrt(its variance + eps), in fp32.

    MAE's ``norm_pix_loss`` (arXiv 2111.06377, unbiased variance over the patch's pixels and channels): the head
    predicts local contrast, not the patch's brightness; a flat patch's target is 0.
    """
    x = patchify(images.float(), patch_size)  # (B, N, p*p*3)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + eps) ** 0.5


def backbone_param_count(model: Beit) -> int:
    """Parameters of the BEiT backbone: everything but the MIM head and the [M] embedding."""
    return sum(p.numel() for n, p in model.named_parameters()
               if not n.startswith(("lm_head.", "pixel_head.", "mask_token")))
