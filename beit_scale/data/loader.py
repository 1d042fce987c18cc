"""The training and evaluation loaders every job uses: this rank's shard, resumable mid-epoch."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from beit_scale.data.sampler import ResumableDistributedSampler


def make_loader(dataset: Dataset, micro_batch: int, num_workers: int, seed: int, train: bool) -> DataLoader:
    """A loader over this rank's shard; training shards reshuffle per epoch from ``seed`` and can resume mid-epoch."""
    sampler = (ResumableDistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True) if train
               else DistributedSampler(dataset, shuffle=False))
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers are re-forked each epoch so they see the dataset's new epoch
        # Its own generator: creating an iterator must not draw from the global RNG that drop path uses,
        # or a run resumed mid-epoch would diverge. Samples do not depend on it (seeded per sample).
        generator=torch.Generator().manual_seed(seed),
    )
