"""Labelled samples for fine-tuning and linear probing: a seeded dataset, class-balanced subsets, eval shards."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from beit_scale.data.folder import SafeImageFolder
from beit_scale.data.seeding import sample_seeds, seeded_sample


class ClassificationSet(Dataset):
    """``{"image", "label", "index", "valid"}`` samples of ``base[indices[i]]``.

    The transform runs with torch, numpy and Python's ``random`` (timm's RandAugment uses all three) seeded from
    ``(seed, epoch, base index)``. ``valid`` is False for the padding entries of an evaluation shard (counted
    nowhere).
    """

    def __init__(self, base: SafeImageFolder, indices: Sequence[int], transform: Callable, seed: int,
                 valid: Optional[Sequence[bool]] = None):
        self.base, self.indices, self.transform, self.seed = base, list(indices), transform, seed
        self.valid = list(valid) if valid is not None else [True] * len(self.indices)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        img, label = self.base[index]
        _, sample_seed = sample_seeds(self.seed, self.epoch, index)
        with seeded_sample(sample_seed):
            image = self.transform(img)
        return {"image": image, "label": int(label), "index": index, "valid": self.valid[i]}


def class_balanced_subset(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of ``round(fraction * n_c)`` (at least 1) samples of every class, drawn with ``seed``."""
    if fraction >= 1.0:
        return list(range(len(targets)))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_class[int(t)].append(i)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in sorted(by_class):
        members = np.asarray(by_class[c])
        chosen += rng.permutation(members)[:max(1, round(fraction * len(members)))].tolist()
    return sorted(chosen)


def eval_shard(n: int, rank: int, world: int) -> tuple[list[int], list[bool]]:
    """This rank's strided share of ``n`` samples, padded so that every rank runs as many batches (ZeRO-3 gathers
    parameters collectively in each forward); padding entries are marked invalid, so each sample counts once."""
    per_rank = -(-n // world)
    positions = [rank + j * world for j in range(per_rank)]
    return [p % n for p in positions], [p < n for p in positions]
