"""Patch masks for masked image modeling: blockwise (BEiT) and uniform random.

A mask is a boolean numpy array of shape ``(h, w)`` over the patch grid, ``True`` where the patch is
masked, with exactly ``num_masked`` masked patches. Generators take a ``numpy.random.Generator`` and use
no other source of randomness, so a sample's mask is a pure function of the generator's state. The data
pipeline gets that state from :func:`sample_seed`, which makes the mask a pure function of
``(seed, epoch, index)`` whatever the worker, rank or resume point.

Blockwise masking follows Algorithm 1 of BEiT (arXiv 2106.08254): repeatedly draw a block size ``s`` and a
log-uniform aspect ratio ``r``, place an ``round(sqrt(s*r)) x round(sqrt(s/r))`` block at a random
position, and add it to the mask, until the mask holds ``num_masked`` patches.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

MaskGenerator = Callable[[np.random.Generator], np.ndarray]

MASK_KINDS = ("blockwise", "random")


def _check_grid(grid) -> tuple[int, int]:
    """Return ``grid`` as ``(h, w)`` ints or raise a ValueError naming the fix."""
    try:
        h, w = grid
    except (TypeError, ValueError):
        raise ValueError(
            f"masking.grid={grid!r} must be a pair (h, w) of patches per side, e.g. (14, 14) for 224 px / patch 16"
        ) from None
    if not all(_is_int(v) and v >= 1 for v in (h, w)):
        raise ValueError(
            f"masking.grid={grid!r} must hold two positive ints (patches per side), "
            "e.g. (14, 14) for 224 px / patch 16"
        )
    return int(h), int(w)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_num_masked(num_masked, h: int, w: int) -> int:
    """Return ``num_masked`` as an int in ``[1, h*w)`` or raise a ValueError naming the fix."""
    if not _is_int(num_masked):
        raise ValueError(f"masking.num_masked={num_masked!r} must be an int (number of masked patches)")
    if num_masked < 1:
        raise ValueError(f"masking.num_masked={num_masked} must be >= 1; set it to e.g. 40% of the {h * w} patches")
    if num_masked >= h * w:
        raise ValueError(
            f"masking.num_masked={num_masked} must be < {h * w} patches (grid {h}x{w}); "
            f"lower it, e.g. to {round(0.4 * h * w)} (40%)"
        )
    return int(num_masked)


class BlockwiseMaskGenerator:
    """BEiT blockwise masking (Algorithm 1 of arXiv 2106.08254) with an exact masked count.

    Each block: draw a size ``s`` uniformly in ``[min_block_patches, max_block_patches]``, capped at the
    number of patches still needed (when fewer than ``min_block_patches`` remain, the block may be smaller so
    the target is still reached); draw an aspect ratio ``r`` log-uniformly in ``[min_aspect, max_aspect]``;
    the block is ``round(sqrt(s*r))`` rows by ``round(sqrt(s/r))`` columns, clipped to the grid, at a
    uniformly random top-left corner. Blocks may overlap masked patches; only new patches count.

    Exactness: a block that would add more patches than are still needed, or none at all, is rejected and
    the block is redrawn, so the count never exceeds ``num_masked``. After ``MAX_ATTEMPTS`` rejections in a
    row the block loop has stalled (as in the reference implementation, which then returns a short mask);
    here the remaining patches are added one at a time, each drawn from ``rng`` uniformly among the unmasked
    patches 4-adjacent to the mask (any unmasked patch if the mask is empty). The count is then exactly
    ``num_masked``, the fill-in grows existing blocks instead of scattering isolated patches, and the result
    is still a pure function of ``rng``. No removal step is needed since the count never overshoots.

    Args:
        grid: Patch grid ``(h, w)``, e.g. ``(14, 14)`` for 224 px images and 16 px patches.
        num_masked: Number of masked patches per mask, ``1 <= num_masked < h*w``.
        min_block_patches: Smallest block size drawn (16 in BEiT), ``1 <= min_block_patches <= num_masked``.
        max_block_patches: Largest block size drawn; ``None`` means ``num_masked`` (Algorithm 1: the size
            is only capped by the number of patches still needed).
        min_aspect: Smallest block height/width ratio, in ``(0, 1]`` (0.3 in BEiT).
        max_aspect: Largest block height/width ratio, ``>= 1``; ``None`` means ``1 / min_aspect``.
    """

    MAX_ATTEMPTS = 10
    """Rejected blocks in a row after which the block loop stops and single-patch fill-in finishes."""

    def __init__(
        self,
        grid: tuple[int, int],
        num_masked: int,
        min_block_patches: int = 16,
        max_block_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = _check_grid(grid)
        self.num_masked = _check_num_masked(num_masked, self.height, self.width)
        if not _is_int(min_block_patches) or not 1 <= min_block_patches <= self.num_masked:
            raise ValueError(
                f"masking.min_block_patches={min_block_patches!r} must be an int >= 1 and <= "
                f"masking.num_masked={self.num_masked}; lower it (BEiT uses 16)"
            )
        self.min_block_patches = int(min_block_patches)
        if max_block_patches is None:
            max_block_patches = self.num_masked
        if not _is_int(max_block_patches) or max_block_patches < self.min_block_patches:
            raise ValueError(
                f"masking.max_block_patches={max_block_patches!r} must be an int >= "
                f"masking.min_block_patches={self.min_block_patches}; raise it or leave it unset for num_masked"
            )
        self.max_block_patches = int(max_block_patches)
        if not isinstance(min_aspect, (int, float)) or not 0 < min_aspect <= 1:
            raise ValueError(f"masking.min_aspect={min_aspect!r} must be in (0, 1] (height/width); BEiT uses 0.3")
        self.min_aspect = float(min_aspect)
        if max_aspect is None:
            max_aspect = 1.0 / self.min_aspect
        if not isinstance(max_aspect, (int, float)) or not 1 <= max_aspect < math.inf:
            raise ValueError(
                f"masking.max_aspect={max_aspect!r} must be a finite number >= 1 (height/width); "
                "leave it unset for 1 / min_aspect"
            )
        self.max_aspect = float(max_aspect)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid=({self.height}, {self.width}), num_masked={self.num_masked}, "
            f"min_block_patches={self.min_block_patches}, max_block_patches={self.max_block_patches}, "
            f"min_aspect={self.min_aspect}, max_aspect={self.max_aspect})"
        )

    def sample_block(self, rng: np.random.Generator, max_patches: int) -> tuple[int, int, int, int] | None:
        """Draw one candidate block.

        Args:
            rng: Source of randomness (4 draws per call).
            max_patches: Cap on the drawn size ``s``, normally the number of patches still needed.

        Returns:
            ``(top, left, height, width)`` of a block inside the grid, or ``None`` when clipping the block
            to the grid would push its height/width outside ``[min_aspect, max_aspect]``, further than
            rounding alone does. That only happens on non-square grids: on an ``n x n`` grid, ``s < n*n``
            means only the long side can exceed ``n``, and clipping it moves the ratio towards 1.
        """
        if max_patches < 1:
            raise ValueError(f"max_patches={max_patches} must be >= 1 (patches still needed)")
        low = min(self.min_block_patches, max_patches)
        high = min(self.max_block_patches, max_patches)
        size = rng.uniform(low, high)
        aspect = math.exp(rng.uniform(*self._log_aspect))
        # Round half up, then clip to [1, grid side].
        height = math.floor(math.sqrt(size * aspect) + 0.5)
        width = math.floor(math.sqrt(size / aspect) + 0.5)
        clipped_h = min(max(height, 1), self.height)
        clipped_w = min(max(width, 1), self.width)
        # Rounding alone may leave [min_aspect, max_aspect] slightly (e.g. 15x4); clipping may not go further.
        rounded = height / width if width else math.inf
        clipped = clipped_h / clipped_w
        if not min(self.min_aspect, rounded) <= clipped <= max(self.max_aspect, rounded):
            return None
        top = int(rng.integers(0, self.height - clipped_h + 1))
        left = int(rng.integers(0, self.width - clipped_w + 1))
        return top, left, clipped_h, clipped_w

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Return a bool mask of shape ``(h, w)`` with exactly ``num_masked`` True entries."""
        mask = np.zeros((self.height, self.width), dtype=bool)  # (h, w)
        count = 0
        failures = 0
        while count < self.num_masked and failures < self.MAX_ATTEMPTS:
            remaining = self.num_masked - count
            block = self.sample_block(rng, remaining)
            if block is None:
                failures += 1
                continue
            top, left, height, width = block
            region = mask[top : top + height, left : left + width]  # view into mask
            new = height * width - int(np.count_nonzero(region))
            if new == 0 or new > remaining:
                failures += 1
                continue
            region[...] = True
            count += new
            failures = 0
        if count < self.num_masked:
            logger.debug("block loop stalled at %d/%d masked patches; filling in", count, self.num_masked)
            self._fill_in(mask, self.num_masked - count, rng)
        assert int(np.count_nonzero(mask)) == self.num_masked
        return mask

    @staticmethod
    def _fill_in(mask: np.ndarray, num_missing: int, rng: np.random.Generator) -> None:
        """Mask ``num_missing`` more patches in place, one at a time, next to the mask where possible."""
        for _ in range(num_missing):
            frontier = np.zeros_like(mask)  # (h, w): unmasked patches 4-adjacent to a masked one
            frontier[1:, :] |= mask[:-1, :]
            frontier[:-1, :] |= mask[1:, :]
            frontier[:, 1:] |= mask[:, :-1]
            frontier[:, :-1] |= mask[:, 1:]
            frontier &= ~mask
            candidates = np.flatnonzero(frontier)
            if candidates.size == 0:  # empty mask (a full one cannot happen: num_masked < h*w)
                candidates = np.flatnonzero(~mask)
            mask.flat[candidates[rng.integers(candidates.size)]] = True


class RandomMaskGenerator:
    """Uniform random masking: ``num_masked`` distinct patches drawn uniformly without replacement.

    Args:
        grid: Patch grid ``(h, w)``.
        num_masked: Number of masked patches per mask, ``1 <= num_masked < h*w``.
    """

    def __init__(self, grid: tuple[int, int], num_masked: int) -> None:
        self.height, self.width = _check_grid(grid)
        self.num_masked = _check_num_masked(num_masked, self.height, self.width)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grid=({self.height}, {self.width}), num_masked={self.num_masked})"

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Return a bool mask of shape ``(h, w)`` with exactly ``num_masked`` True entries."""
        mask = np.zeros(self.height * self.width, dtype=bool)  # (h*w,)
        mask[rng.choice(mask.size, size=self.num_masked, replace=False)] = True
        return mask.reshape(self.height, self.width)


def sample_seed(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Return the generator for one sample's mask: ``np.random.default_rng([seed, epoch, index])``.

    The mask then depends only on ``(seed, epoch, index)``, not on the worker, rank or resume point.

    Args:
        seed: Run seed, ``>= 0``.
        epoch: Epoch number, ``>= 0``.
        index: Dataset index of the sample, ``>= 0``.
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"sample_seed {name}={value!r} must be an int >= 0")
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def build_mask_generator(
    kind: str,
    grid: tuple[int, int],
    num_masked: int,
    min_block_patches: int = 16,
    min_aspect: float = 0.3,
) -> MaskGenerator:
    """Build a mask generator from the masking config.

    Args:
        kind: ``"blockwise"`` (BEiT) or ``"random"``.
        grid: Patch grid ``(h, w)``.
        num_masked: Number of masked patches per mask.
        min_block_patches: Smallest block size; blockwise only.
        min_aspect: Smallest block height/width ratio; blockwise only (the largest is ``1 / min_aspect``).

    Returns:
        A callable ``rng -> bool mask (h, w)``.
    """
    if kind == "blockwise":
        return BlockwiseMaskGenerator(grid, num_masked, min_block_patches=min_block_patches, min_aspect=min_aspect)
    if kind == "random":
        return RandomMaskGenerator(grid, num_masked)
    raise ValueError(f"masking.kind={kind!r} must be one of {', '.join(repr(k) for k in MASK_KINDS)}")
