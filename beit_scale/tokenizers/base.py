"""What every visual tokenizer provides, and checks shared by all of them.

BEiT pretraining predicts, for each masked patch, the id of the visual token that an image tokenizer
assigns to the same region of a smaller view of the image. The tokenizer's token grid must therefore
match the model's patch grid exactly; :func:`check_token_grid` enforces that before anything heavy starts.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["ArchTokenizer", "VisualTokenizer", "check_arch_ints", "check_token_grid", "codebook_stats"]


def check_arch_ints(arch) -> None:
    """Every field of a tokenizer's architecture dataclass is an int (not a bool), and ``vocab_size >= 2``; the
    message names the ``tokenizer.<field>`` to change."""
    for field in dataclasses.fields(arch):
        value = getattr(arch, field.name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"tokenizer.{field.name}={value!r} must be an int")
    if arch.vocab_size < 2:
        raise ValueError(f"tokenizer.vocab_size={arch.vocab_size} must be >= 2 (BEiT and DALL-E use 8192)")


@runtime_checkable
class VisualTokenizer(Protocol):
    """An image tokenizer: maps each region of a square image to one of ``vocab_size`` token ids.

    Attributes:
        vocab_size: Number of visual tokens.
        input_size: Side in pixels of the square view the tokenizer reads.
        grid_size: Tokens per side, ``input_size // downsample``.
    """

    vocab_size: int
    input_size: int
    grid_size: int

    def map_pixels(self, x: Tensor) -> Tensor:
        """Maps ``[0, 1]`` pixels to this tokenizer's input space.

        Args:
            x: Pixels in ``[0, 1]``, any shape.

        Returns:
            The mapped pixels, same shape.
        """
        ...

    def encode(self, images: Tensor) -> Tensor:
        """Tokenizes images that were already passed through :meth:`map_pixels`.

        Args:
            images: ``(B, 3, input_size, input_size)`` mapped pixels.

        Returns:
            ``(B, grid_size * grid_size)`` int64 ids in ``[0, vocab_size)``, row-major over the grid.
        """
        ...


class ArchTokenizer:
    """The `VisualTokenizer` sizes of a tokenizer module read from its ``arch`` dataclass (``vocab_size``,
    ``input_size``, ``downsample``, ``grid_size``), its input check, and, for a convolutional encoder that ends in
    per-position logits (``self.encoder``), :meth:`logits` and :meth:`encode`. Mixed into the tokenizers."""

    arch: "object"  # a frozen dataclass with vocab_size, input_size, downsample and grid_size
    encoder: "torch.nn.Module"

    @property
    def vocab_size(self) -> int:
        """Number of visual tokens."""
        return self.arch.vocab_size

    @property
    def input_size(self) -> int:
        """Side in pixels of the square tokenizer view."""
        return self.arch.input_size

    @property
    def downsample(self) -> int:
        """Pixels per token side."""
        return self.arch.downsample

    @property
    def grid_size(self) -> int:
        """Tokens per side."""
        return self.arch.grid_size

    def _check_images(self, images: Tensor) -> None:
        size = self.arch.input_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(f"images of shape {tuple(images.shape)} do not match the {type(self).__name__} "
                             f"tokenizer view (B, 3, {size}, {size}); resize the tokenizer view to "
                             f"tokenizer.input_size={size}")

    def logits(self, images: Tensor) -> Tensor:
        """``(B, vocab, h, w)`` float32 encoder logits of ``(B, 3, S, S)`` images already passed through
        ``map_pixels``, ``h = w = grid_size``."""
        self._check_images(images)
        return self.encoder(images).float()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(B, h * w)`` int64 ids in ``[0, vocab_size)`` of mapped ``(B, 3, S, S)`` images, row-major over the
        grid: the argmax code at each position."""
        return self.logits(images).argmax(dim=1).flatten(1)  # (B, h, w) -> (B, h * w)


def codebook_stats(ids: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Measures how much of the codebook a batch of token ids uses.

    Runs on the ids' device without a host sync, so it is safe to call every step and log later.
    Ids outside ``[0, vocab_size)`` are not checked here (that would need a sync); they raise a
    device-side index error.

    Args:
        ids: Integer token ids, any shape.
        vocab_size: Number of visual tokens.

    Returns:
        ``(usage, perplexity)`` as 0-dim float32 tensors: ``usage`` is the fraction of the vocabulary that
        occurs in ``ids``; ``perplexity`` is ``exp`` of the entropy (in nats) of the empirical code
        histogram, between 1 (one code) and the number of codes used (uniform use).

    Raises:
        ValueError: If ``ids`` is empty or not an integer tensor, or ``vocab_size < 1``.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1; pass the tokenizer's vocab_size")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor of token ids, got dtype {ids.dtype}; pass encode() output")
    if ids.numel() == 0:
        raise ValueError("ids is empty; codebook_stats needs at least one token id")
    flat = ids.reshape(-1).long()  # (n,)
    # scatter_add instead of bincount: bincount with a CUDA input syncs to find its output size.
    counts = torch.zeros(vocab_size, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (vocab,)
    probs = counts.to(torch.float32) / flat.numel()  # (vocab,)
    usage = (counts > 0).to(torch.float32).mean()
    entropy = -torch.special.xlogy(probs, probs).sum()  # xlogy(0, 0) = 0 for unused codes
    return usage, entropy.exp()


def check_token_grid(tokenizer_input_size: int, downsample: int, img_size: int, patch_size: int) -> None:
    """Checks that the tokenizer's token grid equals the model's patch grid.

    The tokenizer view is never cropped to make the grids agree: a mismatch is a configuration error.

    Args:
        tokenizer_input_size: Side in pixels of the tokenizer view (``tokenizer.input_size``).
        downsample: Tokenizer downsampling factor, pixels per token side.
        img_size: Side in pixels of the model's input image.
        patch_size: Side in pixels of one model patch.

    Raises:
        ValueError: If a size is not positive, a size is not divisible by its stride, or the grids differ.
            The message says which ``tokenizer.input_size`` would match.
    """
    for name, value in (
        ("tokenizer.input_size", tokenizer_input_size),
        ("downsample", downsample),
        ("img_size", img_size),
        ("patch_size", patch_size),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} must be a positive number of pixels")
    if img_size % patch_size:
        raise ValueError(
            f"model img_size {img_size} is not divisible by patch {patch_size}; "
            f"use img_size {img_size // patch_size * patch_size} or a patch size that divides it"
        )
    patch_grid = img_size // patch_size
    wanted = patch_grid * downsample
    if tokenizer_input_size % downsample:
        raise ValueError(
            f"tokenizer.input_size={tokenizer_input_size} is not divisible by downsample {downsample}; "
            f"set tokenizer.input_size={wanted} to match the {patch_grid}x{patch_grid} patch grid "
            f"(img_size {img_size} / patch {patch_size})"
        )
    token_grid = tokenizer_input_size // downsample
    if token_grid != patch_grid:
        raise ValueError(
            f"tokenizer.input_size={tokenizer_input_size} with downsample {downsample} gives a "
            f"{token_grid}x{token_grid} token grid but model patch grid is {patch_grid}x{patch_grid} "
            f"(img_size {img_size} / patch {patch_size}); set tokenizer.input_size={wanted}"
        )
