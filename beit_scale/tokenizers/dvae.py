"""A trainable discrete VAE image tokenizer (BEiT stage 1, as in DALL-E).

A conv encoder turns each ``downsample x downsample`` region of the tokenizer view into logits over
``vocab_size`` visual tokens. Training relaxes the discrete choice with Gumbel-softmax: the soft one-hot
mixes codebook embeddings, a conv decoder reconstructs the view, and the loss is the reconstruction MSE
plus a weighted KL to the uniform prior over tokens. At tokenization time the code is the argmax.

The module is plain PyTorch (no custom autograd, no buffers) so it trains under bf16 autocast, with the
weights cast to bf16, and under DeepSpeed ZeRO; softmax, KL and losses are computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit_scale.tokenizers.base import ArchTokenizer, check_arch_ints

__all__ = ["DVAEArch", "DVAEOutput", "DiscreteVAE", "gumbel_temperature"]

_PIXEL_EPS = 0.1  # DALL-E's margin: pixels live in [eps, 1 - eps] so the decoder never has to hit 0 or 1
_MAX_CHANNEL_MULT = 8  # channels double per stride-2 stage, up to this multiple of hidden_dim


@dataclasses.dataclass(frozen=True)
class DVAEArch:
    """Shape of a :class:`DiscreteVAE`; ``dataclasses.asdict`` of it is enough to rebuild the model."""

    vocab_size: int = 8192
    """Number of visual tokens (codebook entries)."""
    input_size: int = 112
    """Side in pixels of the square tokenizer view."""
    downsample: int = 8
    """Pixels per token side; a power of two >= 2, one stride-2 stage per factor of two."""
    hidden_dim: int = 64
    """Conv channels at full resolution; doubled per stage, capped at 8x."""
    codebook_dim: int = 512
    """Width of each codebook embedding."""
    num_res_blocks: int = 1
    """Residual blocks per resolution stage, in both encoder and decoder."""

    def __post_init__(self) -> None:
        check_arch_ints(self)
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"tokenizer.downsample={self.downsample} must be a power of two >= 2, e.g. 8")
        if self.input_size < self.downsample or self.input_size % self.downsample:
            nearest = max(1, -(-self.input_size // self.downsample)) * self.downsample  # next multiple up
            raise ValueError(
                f"tokenizer.input_size={self.input_size} must be a positive multiple of "
                f"tokenizer.downsample={self.downsample}; set tokenizer.input_size={nearest}"
            )
        for name in ("hidden_dim", "codebook_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"tokenizer.{name}={getattr(self, name)} must be >= 1")
        if self.num_res_blocks < 0:
            raise ValueError(f"tokenizer.num_res_blocks={self.num_res_blocks} must be >= 0")

    @property
    def num_stages(self) -> int:
        """Number of stride-2 stages, ``log2(downsample)``."""
        return self.downsample.bit_length() - 1

    @property
    def grid_size(self) -> int:
        """Tokens per side, ``input_size // downsample``."""
        return self.input_size // self.downsample

    def channels(self, stage: int) -> int:
        """Conv channels at ``stage`` (0 = full resolution, ``num_stages`` = token grid)."""
        return self.hidden_dim * min(2**stage, _MAX_CHANNEL_MULT)


class DVAEOutput(NamedTuple):
    """What :meth:`DiscreteVAE.forward` returns; all losses are 0-dim float32 tensors."""

    loss: Tensor
    """``recon_loss + kl_weight * kl``, the training objective."""
    recon_loss: Tensor
    """MSE between reconstruction and input, in mapped pixel space."""
    kl: Tensor
    """KL from the code posterior to the uniform prior, in nats, averaged over token positions."""
    recon: Tensor
    """``(B, 3, S, S)`` reconstruction in mapped pixel space, in the decoder's dtype."""
    logits: Tensor
    """``(B, vocab, h, w)`` float32 encoder logits."""


class _ResBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``, at constant channels and resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _Codebook(nn.Module):
    """Codebook embeddings, looked up by hard ids or mixed by soft one-hot weights.

    Both modes go through ``forward`` so that DeepSpeed ZeRO-3 gathers the weight for either.
    """

    def __init__(self, vocab_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, codebook_dim))  # (vocab, D)

    def forward(self, codes: Tensor) -> Tensor:
        """Embeds codes on the token grid.

        Args:
            codes: ``(B, h, w)`` integer ids, or ``(B, vocab, h, w)`` soft one-hot weights.

        Returns:
            ``(B, D, h, w)`` embeddings in the weight's dtype (or the autocast dtype).
        """
        if not codes.dtype.is_floating_point:
            return F.embedding(codes, self.weight).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
        return torch.einsum("bkhw,kd->bdhw", codes.to(self.weight.dtype), self.weight)  # (B, D, h, w)


def _res_blocks(channels: int, num_blocks: int) -> list[nn.Module]:
    return [_ResBlock(channels) for _ in range(num_blocks)]


class DiscreteVAE(ArchTokenizer, nn.Module):
    """Discrete VAE tokenizer trained with Gumbel-softmax and a uniform prior; a :class:`VisualTokenizer`.

    Args:
        arch: Model shape; kept as ``self.arch`` so the model can be rebuilt from saved metadata.

    Example:
        >>> model = DiscreteVAE(DVAEArch(vocab_size=16, input_size=16, downsample=4, hidden_dim=8))
        >>> images = DiscreteVAE.map_pixels(torch.rand(2, 3, 16, 16))
        >>> model.encode(images).shape
        torch.Size([2, 16])
    """

    def __init__(self, arch: DVAEArch) -> None:
        super().__init__()
        self.arch = arch
        bottom = arch.channels(arch.num_stages)

        encoder: list[nn.Module] = [nn.Conv2d(3, arch.channels(0), 3, padding=1)]
        for stage in range(arch.num_stages):
            encoder += _res_blocks(arch.channels(stage), arch.num_res_blocks)
            encoder += [nn.ReLU(), nn.Conv2d(arch.channels(stage), arch.channels(stage + 1), 4, stride=2, padding=1)]
        encoder += _res_blocks(bottom, arch.num_res_blocks)
        encoder += [nn.ReLU(), nn.Conv2d(bottom, arch.vocab_size, 1)]
        self.encoder = nn.Sequential(*encoder)

        self.codebook = _Codebook(arch.vocab_size, arch.codebook_dim)

        decoder: list[nn.Module] = [nn.Conv2d(arch.codebook_dim, bottom, 1)]
        decoder += _res_blocks(bottom, arch.num_res_blocks)
        for stage in reversed(range(arch.num_stages)):
            decoder += [
                nn.ReLU(),
                nn.ConvTranspose2d(arch.channels(stage + 1), arch.channels(stage), 4, stride=2, padding=1),
            ]
            decoder += _res_blocks(arch.channels(stage), arch.num_res_blocks)
        decoder += [nn.ReLU(), nn.Conv2d(arch.channels(0), 3, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    @staticmethod
    def map_pixels(x: Tensor) -> Tensor:
        """Maps ``[0, 1]`` pixels to ``[eps, 1 - eps]`` with DALL-E's ``eps = 0.1``."""
        return (1 - 2 * _PIXEL_EPS) * x + _PIXEL_EPS

    @staticmethod
    def unmap_pixels(x: Tensor) -> Tensor:
        """Inverts :meth:`map_pixels` and clamps to ``[0, 1]`` (for viewing reconstructions)."""
        return ((x - _PIXEL_EPS) / (1 - 2 * _PIXEL_EPS)).clamp(0, 1)

    def decode_ids(self, ids: Tensor) -> Tensor:
        """Reconstructs images from token ids.

        Args:
            ids: ``(B, h * w)`` integer ids, row-major over the grid.

        Returns:
            ``(B, 3, S, S)`` reconstruction in mapped pixel space (see :meth:`unmap_pixels`).
        """
        grid = self.arch.grid_size
        if ids.dim() != 2 or ids.shape[1] != grid * grid or ids.dtype.is_floating_point:
            raise ValueError(
                f"ids of shape {tuple(ids.shape)} and dtype {ids.dtype} must be integer (B, {grid * grid}) "
                f"for a {grid}x{grid} token grid; pass encode() output"
            )
        codes = self.codebook(ids.long().view(-1, grid, grid))  # (B, D, h, w)
        return self.decoder(codes)  # (B, 3, S, S)

    def forward(self, images: Tensor, temperature: float, kl_weight: float) -> DVAEOutput:
        """One training pass: Gumbel-softmax relaxed codes, reconstruction and losses.

        Args:
            images: ``(B, 3, S, S)`` pixels already passed through :meth:`map_pixels`.
            temperature: Gumbel-softmax temperature, > 0 (see :func:`gumbel_temperature`).
            kl_weight: Weight of the KL to the uniform prior, >= 0.

        Returns:
            A :class:`DVAEOutput`; ``loss`` is the objective to minimise.
        """
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0; use gumbel_temperature(step, total_steps)")
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight={kl_weight} must be >= 0")
        logits = self.logits(images)  # (B, vocab, h, w) float32
        soft_one_hot = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)  # (B, vocab, h, w)
        recon = self.decoder(self.codebook(soft_one_hot))  # (B, D, h, w) -> (B, 3, S, S)
        recon_loss = F.mse_loss(recon.float(), images.float())
        log_q = F.log_softmax(logits, dim=1)  # (B, vocab, h, w)
        kl = (log_q.exp() * (log_q + math.log(self.arch.vocab_size))).sum(dim=1).mean()
        return DVAEOutput(recon_loss + kl_weight * kl, recon_loss, kl, recon, logits)


def gumbel_temperature(step: int, total_steps: int, start: float = 1.0, end: float = 1 / 16) -> float:
    """Gumbel-softmax temperature, annealed exponentially from ``start`` to ``end``.

    Args:
        step: Global optimizer step, >= 0.
        total_steps: Steps over which to anneal; the temperature stays at ``end`` afterwards.
        start: Temperature at step 0, > 0.
        end: Temperature from ``total_steps`` on, > 0.

    Returns:
        ``start * (end / start) ** (min(step, total_steps) / total_steps)``.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1; set it to the number of annealing steps")
    if not (start > 0 and end > 0):
        raise ValueError(f"temperatures start={start} and end={end} must both be > 0")
    return start * (end / start) ** (min(step, total_steps) / total_steps)
