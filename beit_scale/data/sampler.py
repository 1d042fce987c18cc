"""A distributed sampler that can start mid-epoch, so a resumed run sees exactly the remaining samples."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose current epoch can skip the samples this rank already consumed.

    The permutation of an epoch depends only on ``(seed, epoch)``, so the samples after the skip are the
    ones an uninterrupted run would have seen. The skip applies to the next epoch set with
    :meth:`set_position` only; later epochs start at their beginning.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0  # samples of this rank's shard already consumed in the current epoch

    def set_position(self, epoch: int, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"sampler position {start} is outside this rank's {self.num_samples} samples of epoch {epoch}")
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start
