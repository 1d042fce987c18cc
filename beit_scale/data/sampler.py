"""A distributed sampler that can start mid-epoch, so a resumed run sees exactly the remaining samples."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose current epoch can skip the samples every rank together already consumed.

    The permutation of an epoch depends only on ``(seed, epoch)``, and rank ``r`` of ``W`` reads positions
    ``r, r + W, r + 2W, ...`` of it. After every rank consumed ``b`` samples, the ranks together consumed
    exactly the first ``b * W`` positions. So the position is kept as that global count, and a run resumed
    on another number of ranks continues at the same place of the same permutation: no sample is lost or
    repeated, and each global batch holds the same samples (up to the tail that ``drop_last`` cuts per epoch).
    The skip applies to the next epoch set with :meth:`set_position` only; later epochs start at their beginning.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0  # samples of this rank's shard to skip in the current epoch

    def check_position(self, epoch: int, global_start: int) -> None:
        """Raise ValueError when ``global_start`` samples of ``epoch`` cannot be split over this world size."""
        if global_start % self.num_replicas:
            raise ValueError(
                f"the run stopped after {global_start} samples of epoch {epoch}, which {self.num_replicas} ranks "
                f"cannot split evenly; resume on a number of ranks that divides {global_start} (e.g. the saved one)")
        if not 0 <= global_start // self.num_replicas <= self.num_samples:
            raise ValueError(f"sampler position {global_start} is outside the {self.total_size} samples of "
                             f"epoch {epoch}")

    def set_position(self, epoch: int, global_start: int) -> None:
        """Continue ``epoch`` after its first ``global_start`` samples (counted over all ranks)."""
        self.check_position(epoch, global_start)
        self.set_epoch(epoch)
        self.start = global_start // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start
