"""Per-sample randomness: every random choice for a sample is a pure function of ``(seed, epoch, index)``.

The result therefore does not depend on the number of data-loader workers, on which worker loads which
index, or on the order of loading, and a resumed run sees exactly the samples the interrupted run would
have seen. Pretraining and fine-tuning datasets both draw through :func:`seeded_sample`.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

# Spawn key of the child seed sequence that seeds torch, so the torch stream is independent of the
# numpy mask stream that `default_rng([seed, epoch, index])` derives from the same triple.
_TORCH_STREAM = 1


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, int]:
    """Derive the random state of one sample.

    Returns:
        ``(mask_rng, sample_seed)``: ``numpy.random.default_rng([seed, epoch, index])`` for a mask generator
        and a 64-bit seed for the global RNGs (:func:`seeded_sample`) drawn from an independent child stream.
    """
    mask_rng = np.random.default_rng([seed, epoch, index])
    child = np.random.SeedSequence([seed, epoch, index], spawn_key=(_TORCH_STREAM,))
    sample_seed = int(child.generate_state(1, dtype=np.uint64)[0])
    return mask_rng, sample_seed


def _seed_all(sample_seed: int) -> None:
    # The CPU generator only: torch.manual_seed would also reseed (and leave changed) the CUDA generators when
    # the loader runs in the main process, and costs 14x more.
    torch.default_generator.manual_seed(sample_seed)
    random.seed(sample_seed)
    np.random.seed(sample_seed % 2**32)


@contextmanager
def seeded_sample(sample_seed: int) -> Iterator[None]:
    """Run a transform with torch, numpy and Python's ``random`` (torchvision and timm's augmentations use all
    three) seeded from ``sample_seed``. In the main process the global states are restored afterwards; a loader
    worker's are its own and every sample reseeds them, so it skips the restore (numpy's alone costs 85 us)."""
    if get_worker_info() is not None:
        _seed_all(sample_seed)
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            _seed_all(sample_seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
