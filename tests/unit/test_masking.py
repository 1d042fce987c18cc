"""Unit tests for beit_scale.masking: exact counts, reproducibility, block shapes, validation.

Statistical bounds below were measured with the fixed seeds used here (numpy 2.4) and carry wide margins,
so they hold for any reasonable implementation of the algorithm, not only for these exact streams.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from beit_scale.masking import (
    BlockwiseMaskGenerator,
    RandomMaskGenerator,
    build_mask_generator,
    sample_seed,
)


def _component_sizes(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of True entries in a (h, w) bool mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    sizes = []
    for i in range(h):
        for j in range(w):
            if not mask[i, j] or seen[i, j]:
                continue
            seen[i, j] = True
            queue, size = deque([(i, j)]), 0
            while queue:
                a, b = queue.popleft()
                size += 1
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < h and 0 <= d < w and mask[c, d] and not seen[c, d]:
                        seen[c, d] = True
                        queue.append((c, d))
            sizes.append(size)
    return sizes


# --- exact count -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "num_masked", "min_block_patches", "num_seeds"),
    [
        ((14, 14), 75, 16, 1000),
        ((8, 8), 26, 16, 300),
        ((16, 16), 105, 16, 300),
        ((3, 30), 40, 16, 300),  # narrow grid: some blocks rejected by the aspect check
        ((14, 14), 1, 1, 100),
        ((14, 14), 195, 16, 100),  # all but one patch: blocks stall, the fill-in finishes nearly every mask
    ],
)
def test_blockwise_masks_exactly_num_masked_patches(grid, num_masked, min_block_patches, num_seeds):
    generator = BlockwiseMaskGenerator(grid, num_masked, min_block_patches=min_block_patches)
    for seed in range(num_seeds):
        mask = generator(np.random.default_rng(seed))
        assert mask.shape == grid and mask.dtype == np.bool_
        assert int(mask.sum()) == num_masked, f"seed {seed}"


def test_blockwise_exact_count_with_small_blocks_and_narrow_aspect():
    # min_block_patches=1 and a near-square aspect exercise the "fewer than min remain" and overlap paths.
    generator = BlockwiseMaskGenerator((14, 14), 150, min_block_patches=1, min_aspect=0.9)
    for seed in range(200):
        assert int(generator(np.random.default_rng(seed)).sum()) == 150


class _NeverFits(BlockwiseMaskGenerator):
    """Every block is rejected, so the mask comes entirely from the single-patch fill-in."""

    def sample_block(self, rng, max_patches):
        return None


def test_fill_in_after_stall_is_exact_connected_and_reproducible():
    generator = _NeverFits((14, 14), 75)
    for seed in range(20):
        mask = generator(np.random.default_rng(seed))
        assert int(mask.sum()) == 75
        # Fill-in grows from the mask's 4-neighbourhood, so starting from empty it makes one component.
        assert _component_sizes(mask) == [75]
        np.testing.assert_array_equal(mask, generator(np.random.default_rng(seed)))


def test_random_masks_exactly_num_masked_patches():
    for grid, num_masked in [((14, 14), 75), ((8, 8), 26), ((16, 16), 105)]:
        generator = RandomMaskGenerator(grid, num_masked)
        for seed in range(200):
            mask = generator(np.random.default_rng(seed))
            assert mask.shape == grid and mask.dtype == np.bool_
            assert int(mask.sum()) == num_masked


# --- reproducibility -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["blockwise", "random"])
def test_same_seed_same_mask_different_seeds_different_masks(kind):
    generator = build_mask_generator(kind, (14, 14), 75, 16, 0.3)
    masks = [generator(np.random.default_rng(seed)) for seed in range(200)]
    for seed in (0, 7, 199):
        np.testing.assert_array_equal(masks[seed], generator(np.random.default_rng(seed)))
    # 200 draws from an enormous mask space: any repeat would mean the seed is being ignored.
    assert len({mask.tobytes() for mask in masks}) == 200


def test_sample_seed_makes_mask_a_function_of_seed_epoch_index():
    generator = BlockwiseMaskGenerator((14, 14), 75)
    mask = generator(sample_seed(3, 1, 42))
    np.testing.assert_array_equal(mask, generator(sample_seed(3, 1, 42)))
    np.testing.assert_array_equal(mask, generator(np.random.default_rng([3, 1, 42])))
    others = [sample_seed(4, 1, 42), sample_seed(3, 2, 42), sample_seed(3, 1, 43), sample_seed(3, 42, 1)]
    for rng in others:
        assert not np.array_equal(mask, generator(rng))


def test_sample_seed_is_independent_of_draw_order():
    # A data worker may process indices in any order; each mask must depend only on its own triple.
    generator = BlockwiseMaskGenerator((14, 14), 75)
    forward = {i: generator(sample_seed(0, 5, i)) for i in range(10)}
    for i in reversed(range(10)):
        np.testing.assert_array_equal(forward[i], generator(sample_seed(0, 5, i)))


# --- block shape statistics ------------------------------------------------------------------------------


def test_blockwise_masks_are_few_large_components_unlike_random():
    blockwise = BlockwiseMaskGenerator((14, 14), 75, min_block_patches=16)
    random = RandomMaskGenerator((14, 14), 75)
    block_sizes = [_component_sizes(blockwise(np.random.default_rng(seed))) for seed in range(500)]
    random_sizes = [_component_sizes(random(np.random.default_rng(seed))) for seed in range(500)]
    block_count = np.mean([len(sizes) for sizes in block_sizes])
    random_count = np.mean([len(sizes) for sizes in random_sizes])
    block_largest = np.array([max(sizes) for sizes in block_sizes])
    # Measured over 1000 seeds: blockwise mean 2.2 components (max 5), random mean 25.5 (min 14);
    # largest blockwise component >= 16 in 100% of masks (min 28, mean 67) vs 38% for random.
    assert block_count < 3.5
    assert random_count > 20
    assert block_count < random_count / 5
    assert np.mean(block_largest >= 16) >= 0.95
    assert block_largest.mean() > 50


def test_sample_block_size_and_aspect_follow_the_algorithm_up_to_rounding():
    generator = BlockwiseMaskGenerator((14, 14), 75, min_block_patches=16, min_aspect=0.3)
    rng = np.random.default_rng(0)
    blocks = [generator.sample_block(rng, 75) for _ in range(5000)]
    # On a square grid clipping only shortens the long side, so no block is ever rejected.
    assert all(block is not None for block in blocks)
    top, left, height, width = np.array(blocks, dtype=float).T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 14).all() and (left + width <= 14).all()
    # height = round(sqrt(s*r)), width = round(sqrt(s/r)) with s in [16, 75], r in [0.3, 1/0.3]:
    # each side is within 0.5 of a real value satisfying the bounds.
    assert ((height + 0.5) * (width + 0.5) >= 16).all()
    assert ((height - 0.5) * (width - 0.5) <= 75).all()
    assert ((height + 0.5) / (width - 0.5) >= 0.3).all()
    assert ((height - 0.5) / (width + 0.5) <= 1 / 0.3).all()
    ratio, area = height / width, height * width
    # Measured: 97.3% of ratios inside [0.3, 1/0.3] exactly (rounding gives e.g. 8x2), tall 46% /
    # wide 47% (log-uniform aspect is symmetric), mean log ratio -0.005 (standard error ~0.01),
    # mean area 45.3 (uniform size in [16, 75] has mean 45.5).
    assert np.mean((ratio >= 0.3) & (ratio <= 1 / 0.3)) >= 0.95
    assert 0.40 <= np.mean(ratio > 1) <= 0.55 and 0.40 <= np.mean(ratio < 1) <= 0.55
    assert abs(np.log(ratio).mean()) < 0.1
    assert 42 <= area.mean() <= 49


def test_sample_block_caps_size_at_patches_still_needed():
    generator = BlockwiseMaskGenerator((14, 14), 75, min_block_patches=16)
    rng = np.random.default_rng(1)
    for max_patches in (1, 5, 16):
        blocks = np.array([generator.sample_block(rng, max_patches) for _ in range(1000)], dtype=float)
        height, width = blocks[:, 2], blocks[:, 3]
        # Size is drawn exactly at max_patches when it is below min_block_patches.
        assert ((height - 0.5) * (width - 0.5) <= max_patches).all()
        assert ((height + 0.5) * (width + 0.5) >= max_patches).all()


def test_sample_block_clipping_never_widens_aspect_on_narrow_grid():
    generator = BlockwiseMaskGenerator((3, 30), 40)
    rng = np.random.default_rng(2)
    blocks = [generator.sample_block(rng, 40) for _ in range(2000)]
    kept = np.array([block for block in blocks if block is not None], dtype=float)
    assert len(kept) < len(blocks)  # some tall blocks cannot fit 3 rows without leaving the range
    height, width = kept[:, 2], kept[:, 3]
    assert (height <= 3).all() and (kept[:, 1] + width <= 30).all()
    assert ((height + 0.5) / (width - 0.5) >= 0.3).all()


# --- random masking --------------------------------------------------------------------------------------


def test_random_mask_marginals_are_uniform():
    generator = RandomMaskGenerator((14, 14), 75)
    rng = np.random.default_rng(0)
    frequency = np.mean([generator(rng) for _ in range(4000)], axis=0)  # (14, 14)
    # Each patch is masked with p = 75/196 = 0.383; over 4000 draws its frequency has standard deviation
    # sqrt(p(1-p)/4000) = 0.0077, so 0.04 is > 5 sigma even after taking the worst of 196 patches.
    np.testing.assert_allclose(frequency, 75 / 196, atol=0.04)
    assert frequency.sum() == pytest.approx(75)


# --- construction and validation -------------------------------------------------------------------------


def test_build_mask_generator_returns_configured_generator():
    blockwise = build_mask_generator("blockwise", (14, 14), 75, 8, 0.5)
    assert isinstance(blockwise, BlockwiseMaskGenerator)
    assert (blockwise.num_masked, blockwise.min_block_patches, blockwise.max_block_patches) == (75, 8, 75)
    assert (blockwise.min_aspect, blockwise.max_aspect) == (0.5, 2.0)
    random = build_mask_generator("random", (8, 8), 26, 16, 0.3)
    assert isinstance(random, RandomMaskGenerator)
    assert (random.height, random.width, random.num_masked) == (8, 8, 26)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(grid=(14, 14), num_masked=200), r"masking\.num_masked=200 must be < 196 patches \(grid 14x14\)"),
        (dict(grid=(14, 14), num_masked=196), r"masking\.num_masked=196 must be < 196 patches"),
        (dict(grid=(14, 14), num_masked=0), r"masking\.num_masked=0 must be >= 1"),
        (dict(grid=(14, 14), num_masked=75.0), r"masking\.num_masked=75\.0 must be an int"),
        (dict(grid=14, num_masked=75), r"masking\.grid=14 must be a pair \(h, w\)"),
        (dict(grid=(0, 14), num_masked=75), r"masking\.grid=\(0, 14\) must hold two positive ints"),
        (dict(grid=(14, 14), num_masked=75, min_block_patches=0), r"masking\.min_block_patches=0 must be an int >= 1"),
        (
            dict(grid=(14, 14), num_masked=75, min_block_patches=76),
            r"masking\.min_block_patches=76 must be .* <= masking\.num_masked=75",
        ),
        (
            dict(grid=(14, 14), num_masked=75, max_block_patches=8),
            r"masking\.max_block_patches=8 must be an int >= masking\.min_block_patches=16",
        ),
        (dict(grid=(14, 14), num_masked=75, min_aspect=0.0), r"masking\.min_aspect=0\.0 must be in \(0, 1\]"),
        (dict(grid=(14, 14), num_masked=75, min_aspect=1.5), r"masking\.min_aspect=1\.5 must be in \(0, 1\]"),
        (dict(grid=(14, 14), num_masked=75, max_aspect=0.5), r"masking\.max_aspect=0\.5 must be a finite number >= 1"),
    ],
)
def test_blockwise_rejects_bad_config_naming_field_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockwiseMaskGenerator(**kwargs)


@pytest.mark.parametrize(
    ("grid", "num_masked", "match"),
    [
        ((14, 14), 200, r"masking\.num_masked=200 must be < 196 patches \(grid 14x14\)"),
        ((14, 14), 0, r"masking\.num_masked=0 must be >= 1"),
        ((14, -1), 10, r"masking\.grid=\(14, -1\) must hold two positive ints"),
    ],
)
def test_random_rejects_bad_config_naming_field_and_fix(grid, num_masked, match):
    with pytest.raises(ValueError, match=match):
        RandomMaskGenerator(grid, num_masked)


def test_build_mask_generator_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"masking\.kind='block' must be one of 'blockwise', 'random'"):
        build_mask_generator("block", (14, 14), 75, 16, 0.3)


def test_build_mask_generator_validates_through_to_generator():
    with pytest.raises(ValueError, match=r"masking\.min_aspect=0 must be in \(0, 1\]"):
        build_mask_generator("blockwise", (14, 14), 75, 16, 0)


@pytest.mark.parametrize(("args", "match"), [((-1, 0, 0), r"seed=-1 must be an int >= 0"), ((0, 0, 1.5), r"index=1\.5")])
def test_sample_seed_rejects_negative_or_non_int(args, match):
    with pytest.raises(ValueError, match=match):
        sample_seed(*args)


def test_sample_block_rejects_non_positive_budget():
    with pytest.raises(ValueError, match=r"max_patches=0 must be >= 1"):
        BlockwiseMaskGenerator((14, 14), 75).sample_block(np.random.default_rng(0), 0)
