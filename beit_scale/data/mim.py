"""Masked-image-modeling dataset: two augmented views plus a patch mask per sample.

Every random choice for a sample (augmentation and mask) is a pure function of ``(seed, epoch, index)``.
The result therefore does not depend on the number of data-loader workers, on which worker loads which
index, or on the order of loading, and a resumed run sees exactly the samples the interrupted run would
have seen.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from beit_scale.data.seeding import sample_seeds, seeded_sample

MaskGenerator = Callable[[np.random.Generator], np.ndarray]
TwoView = Callable[[Any], tuple[Tensor, Tensor]]


def _check_non_negative_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")


class MIMDataset(Dataset):
    """Wraps an image dataset into BEiT pretraining samples.

    Each item is a dict:

    - ``image``: patch view, float (3, img_size, img_size), normalised.
    - ``tokenizer_view``: float (3, tokenizer_size, tokenizer_size) in the tokenizer's pixel mapping.
    - ``mask``: bool (h * w,), True where a patch is masked; omitted when `mask_generator` is None
      (tokenizer training uses the same dataset without masks).
    - ``index``: the requested index (negative indices counted from the end).
    - ``label``: the class index from `base` (unused by pretraining, handy for probes).
    - ``view_plan``: only from a deferred transform (`FastTwoViewTransform` with ``defer``), whose views are then
      uint8 before the colour maps: `finish_batch` completes a batch of them on the training device.

    The transform runs with torch, numpy and Python's ``random`` seeded from ``(seed, epoch, index)``
    (:func:`~beit_scale.data.seeding.seeded_sample`); the global RNG states are restored afterwards.

    Args:
        base: Dataset returning ``(PIL image, label)``, e.g. `SafeImageFolder` without a transform.
        transform: Two-view transform, e.g. `TwoViewTransform` or `EvalTwoView`.
        mask_generator: Called with a seeded ``numpy.random.Generator``; returns a bool array (h, w) of the
            patch grid. None to produce no mask.
        seed: Run seed, a non-negative integer.
    """

    def __init__(
        self,
        base: Dataset,
        transform: TwoView,
        mask_generator: MaskGenerator | None,
        seed: int,
    ) -> None:
        _check_non_negative_int("seed", seed)
        self.base = base
        self.transform = transform
        self.mask_generator = mask_generator
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations and masks `__getitem__` returns.

        Call it before iterating each epoch; with persistent workers, recreate the iterator so the workers'
        copies see the new epoch.
        """
        _check_non_negative_int("epoch", epoch)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index = int(index) % n
        img, label = self.base[index]
        mask_rng, sample_seed = sample_seeds(self.seed, self.epoch, index)

        with seeded_sample(sample_seed):
            views = self.transform(img)

        sample: dict[str, Any] = {
            "image": views[0],  # (3, img_size, img_size)
            "tokenizer_view": views[1],  # (3, tokenizer_size, tokenizer_size)
            "index": index,
            "label": int(label),
        }
        if len(views) == 3:  # a deferred transform: uint8 views and the plan that finishes them on the device
            sample["view_plan"] = views[2]
        if self.mask_generator is not None:
            mask = np.asarray(self.mask_generator(mask_rng))
            if mask.dtype != np.bool_ or mask.ndim != 2:
                raise ValueError(
                    f"mask_generator returned a {mask.dtype} array of shape {mask.shape}; it must return a "
                    "bool array (h, w) over the patch grid, e.g. (14, 14) for 224 px and patch 16"
                )
            sample["mask"] = torch.from_numpy(mask.reshape(-1).copy())  # (h * w,)
        return sample

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_images={len(self)}, seed={self.seed}, epoch={self.epoch}, "
            f"masked={self.mask_generator is not None}, transform={self.transform!r})"
        )
