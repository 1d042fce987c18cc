"""VQ-KD, BEiT v2's visual tokenizer (arXiv 2208.06366): a ViT encoder, a cosine EMA codebook, and a decoder
that regresses a frozen teacher's patch features.

A ViT (timm blocks) reads the tokenizer view patch by patch; a small projection (linear, tanh, linear) maps each
patch to a ``codebook_dim`` vector, which the :class:`~beit_scale.tokenizers.quantizer.NormEMAQuantizer` replaces
by its nearest code by cosine similarity. During training a second, shallower ViT (the decoder) reads the codes
and predicts the teacher's feature of each patch; the loss is ``1 - cos`` to the teacher's feature plus the
commitment loss. Only the encoder, projection and codebook (:class:`VQKDTokenizer`) are needed to tokenize; the
decoder and the teacher stay with the training job.

Pixels are mapped from ``[0, 1]`` to ``[-1, 1]`` (BEiT v2's default processing).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from beit_scale.tokenizers.base import ArchTokenizer

from beit_scale.tokenizers.quantizer import NormEMAQuantizer

__all__ = ["VQKD", "VQKDArch", "VQKDOutput", "VQKDTokenizer", "cosine_feature_loss"]


@dataclasses.dataclass(frozen=True)
class VQKDArch:
    """Shape of a :class:`VQKDTokenizer`; ``dataclasses.asdict`` of it is enough to rebuild it."""

    vocab_size: int = 8192
    """Number of codes (visual tokens)."""
    input_size: int = 224
    """Side in pixels of the square tokenizer view."""
    downsample: int = 16
    """Patch size of the encoder: pixels per token side."""
    embed_dim: int = 768
    """Width of the encoder (and of the training decoder)."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Attention heads per block."""
    codebook_dim: int = 32
    """Width of each code (BEiT v2: 32)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tokenizer.{field.name}={value!r} must be a positive int")
        if self.vocab_size < 2:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size} must be >= 2 (BEiT v2 uses 8192)")
        if self.input_size % self.downsample:
            nearest = -(-self.input_size // self.downsample) * self.downsample
            raise ValueError(f"tokenizer.input_size={self.input_size} must be a multiple of the patch size "
                             f"tokenizer.downsample={self.downsample}; set tokenizer.input_size={nearest}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"tokenizer.embed_dim={self.embed_dim} must be divisible by tokenizer.num_heads="
                             f"{self.num_heads}")

    @property
    def grid_size(self) -> int:
        """Tokens per side."""
        return self.input_size // self.downsample


class VQKDOutput(NamedTuple):
    """What :meth:`VQKD.forward` returns; losses are 0-dim float32 tensors."""

    loss: Tensor
    """``feature_loss + commitment_weight * commit_loss``."""
    feature_loss: Tensor
    """Mean ``1 - cos`` between the decoder's prediction and the teacher's feature of each patch."""
    commit_loss: Tensor
    """MSE between the normalised encoder outputs and their codes."""
    ids: Tensor
    """``(B, h * w)`` int64 code ids."""


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _task_layer(dim: int, out_dim: int) -> nn.Sequential:
    """BEiT v2's projection between a ViT and the codes: linear, tanh, linear."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out_dim))


class _Transformer(nn.Module):
    """Learned absolute positions, timm ViT blocks, final LayerNorm: ``(B, N, C) -> (B, N, C)``."""

    def __init__(self, num_tokens: int, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(dim)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.blocks(x + self.pos_embed))


class _Encoder(nn.Module):
    """``(B, 3, S, S)`` mapped pixels -> ``(B, h * w, embed_dim)`` patch features."""

    def __init__(self, arch: VQKDArch) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(arch.input_size, arch.downsample, 3, arch.embed_dim)
        self.transformer = _Transformer(arch.grid_size ** 2, arch.embed_dim, arch.depth, arch.num_heads)

    def forward(self, images: Tensor) -> Tensor:
        return self.transformer(self.patch_embed(images))


class VQKDTokenizer(ArchTokenizer, nn.Module):
    """The labelling half of VQ-KD (encoder, projection, codebook); a :class:`VisualTokenizer`.

    Args:
        arch: Its shape, kept as ``self.arch``.
        decay: Codebook EMA decay per training forward (training only).
        dead_code_steps: Restart a code unused this many training forwards; 0 never (training only).

    Example:
        >>> tok = VQKDTokenizer(VQKDArch(vocab_size=16, input_size=16, downsample=4, embed_dim=8, depth=1,
        ...                              num_heads=2, codebook_dim=4))
        >>> tok.encode(tok.map_pixels(torch.rand(2, 3, 16, 16))).shape
        torch.Size([2, 16])
    """

    def __init__(self, arch: VQKDArch, decay: float = 0.99, dead_code_steps: int = 0) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = _Encoder(arch)
        self.project = _task_layer(arch.embed_dim, arch.codebook_dim)
        self.quantizer = NormEMAQuantizer(arch.vocab_size, arch.codebook_dim, decay, dead_code_steps)
        self.project.apply(_init_linear)

    @staticmethod
    def map_pixels(x: Tensor) -> Tensor:
        """``[0, 1]`` pixels -> ``[-1, 1]``."""
        return 2 * x - 1

    @staticmethod
    def unmap_pixels(x: Tensor) -> Tensor:
        """Inverts :meth:`map_pixels`, clamped to ``[0, 1]``."""
        return ((x + 1) / 2).clamp(0, 1)

    def codes_in(self, features: Tensor) -> Tensor:
        """``(B, N, codebook_dim)`` float32 projection of the encoder's ``(B, N, embed_dim)`` features."""
        weight = self.project[0].weight
        return self.project(features.to(weight.dtype)).float()

    def similarities(self, features: Tensor) -> Tensor:
        """``(B, vocab, h, w)`` float32 cosine similarity of each patch to every code, from encoder features.

        The Labeler's fp32 stage: what decides the token (the argmax over dim 1)."""
        z = F.normalize(self.codes_in(features), dim=-1)  # (B, N, D)
        sims = self.quantizer.similarity(z)  # (B, N, K)
        grid = self.arch.grid_size
        return sims.transpose(1, 2).reshape(sims.shape[0], self.arch.vocab_size, grid, grid)

    def labeling_stages(self) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
        """``(trunk, bottom)`` for :class:`~beit_scale.tokenizers.labeler.Labeler`: the ViT encoder (may run under
        autocast) and :meth:`similarities` (run in fp32)."""
        return self.encoder, self.similarities

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(B, h * w)`` int64 ids of ``(B, 3, S, S)`` mapped images: the nearest code of each patch."""
        self._check_images(images)
        return self.similarities(self.encoder(images)).argmax(1).flatten(1)


def cosine_feature_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean over patches of ``1 - cos(prediction, target)``, in float32; ``(B, N, C)`` each."""
    return (1 - F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()


class VQKD(nn.Module):
    """The VQ-KD training model: :class:`VQKDTokenizer` plus a decoder that predicts the teacher's features.

    Args:
        arch: The tokenizer's shape.
        teacher_dim: Width of the teacher's patch features.
        decoder_depth: Decoder blocks (width and heads as the encoder's; BEiT v2: 3 or 1).
        decay: Codebook EMA decay.
        dead_code_steps: Restart codes unused this many steps; 0 never.
        commitment_weight: Weight of the commitment loss (BEiT v2: 1).
    """

    def __init__(self, arch: VQKDArch, teacher_dim: int, decoder_depth: int = 3, decay: float = 0.99,
                 dead_code_steps: int = 0, commitment_weight: float = 1.0) -> None:
        super().__init__()
        if decoder_depth < 1 or teacher_dim < 1:
            raise ValueError(f"tokenizer.decoder_depth={decoder_depth} and the teacher's feature width {teacher_dim} "
                             "must be >= 1")
        self.tokenizer = VQKDTokenizer(arch, decay, dead_code_steps)
        self.decoder_embed = nn.Linear(arch.codebook_dim, arch.embed_dim)
        self.decoder = _Transformer(arch.grid_size ** 2, arch.embed_dim, decoder_depth, arch.num_heads)
        self.decoder_head = _task_layer(arch.embed_dim, teacher_dim)
        self.commitment_weight = commitment_weight
        self.decoder_embed.apply(_init_linear)
        self.decoder_head.apply(_init_linear)

    map_pixels = staticmethod(VQKDTokenizer.map_pixels)

    @property
    def arch(self) -> VQKDArch:
        return self.tokenizer.arch

    def no_weight_decay(self) -> set[str]:
        return {"tokenizer.encoder.transformer.pos_embed", "decoder.pos_embed"}

    def forward(self, images: Tensor, targets: Tensor) -> VQKDOutput:
        """One training pass.

        Args:
            images: ``(B, 3, S, S)`` pixels already passed through :meth:`VQKDTokenizer.map_pixels`.
            targets: ``(B, h * w, teacher_dim)`` the teacher's patch features of the same view.
        """
        tok = self.tokenizer
        tok._check_images(images)
        z = tok.codes_in(tok.encoder(images))  # (B, N, D) float32
        if targets.shape[:2] != z.shape[:2]:
            raise ValueError(f"teacher features of shape {tuple(targets.shape)} do not cover the {tok.grid_size}x"
                             f"{tok.grid_size} token grid of {tuple(images.shape[:1])} images")
        q = tok.quantizer(z)
        weight = self.decoder_embed.weight
        prediction = self.decoder_head(self.decoder(self.decoder_embed(q.quantized.to(weight.dtype))))  # (B, N, T)
        feature_loss = cosine_feature_loss(prediction, targets)
        return VQKDOutput(feature_loss + self.commitment_weight * q.commit_loss, feature_loss, q.commit_loss, q.ids)
