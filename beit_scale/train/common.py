"""Pieces both training loops share: seeding, the epoch-aware loader, metrics and TensorBoard."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(dataset: Dataset, micro_batch: int, num_workers: int, seed: int, train: bool) -> DataLoader:
    """A loader over this rank's shard; training shards reshuffle per epoch from ``seed``."""
    sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers are re-forked each epoch so they see the dataset's new epoch
    )


def epoch_batches(loader: DataLoader) -> Iterator[dict]:
    """Batches forever; each pass over the data sets the epoch on the sampler and the dataset."""
    if len(loader) == 0:
        raise ValueError(
            f"the training set gives no full batch per rank ({len(loader.dataset)} images, "
            f"micro batch {loader.batch_size}); lower train.micro_batch or add images"
        )
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


class Meter:
    """Sums of step metrics kept on the device; read (all-reduced, one host sync) every ``log_every`` steps."""

    def __init__(self, writer, total_steps: int, images_per_step: int):
        self.writer = writer
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = self.window_start = time.perf_counter()
        self.timed_steps = 0  # steps after the first, which carries start-up costs
        self.timed_start: float | None = None

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def step_done(self, step: int) -> None:
        if step == 0:
            self.timed_start = time.perf_counter()
        else:
            self.timed_steps += 1

    @property
    def images_per_second(self) -> float:
        if not self.timed_steps:
            return float("nan")
        return self.timed_steps * self.images_per_step / (time.perf_counter() - self.timed_start)

    def flush(self, step: int, **extra: float) -> dict[str, float]:
        """All-reduce the window's means across ranks, log them and write them to TensorBoard."""
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in names]) / max(self.count, 1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
        now = time.perf_counter()
        values = dict(zip(names, stacked.tolist()))
        values["images_per_s"] = self.count * self.images_per_step / max(now - self.window_start, 1e-9)
        values.update(extra)
        done = step + 1
        eta = (now - self.start) / done * (self.total_steps - done)
        text = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        log.info("step %d/%d (%.0f%%) %s | eta %.0fs", done, self.total_steps, 100 * done / self.total_steps, text, eta)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, done)
        self.sums.clear()
        self.count = 0
        self.window_start = now
        return values


def tensorboard_writer(folder: Path, rank: int):
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))
