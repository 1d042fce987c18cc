"""Semantic segmentation data in the ADE20K layout, with the reference's augmentation (mmseg 0.11's ADE20K pipeline).

Layout (``ADEChallengeData2016``)::

    root/images/{training,validation}/<stem>.jpg
    root/annotations/{training,validation}/<stem>.png    # one uint8 class index per pixel

Training (``configs/_base_/datasets/ade20k.py`` of the BEiT reference): random rescale of the (2048, 512) scale by
a ratio in [0.5, 2] keeping the aspect ratio, random crop holding at most 75% of one class (up to 10 redraws),
horizontal flip with probability 0.5, mmseg's ``PhotoMetricDistortion``, normalisation with the ImageNet mean and
std in 0-255 units, padding to the crop (image 0, label 255). Evaluation: the (2048, 512) rescale only; the label
keeps its original size, so predictions are resized back to it before scoring, as mmseg does.

Every random choice of a sample is a pure function of ``(seed, epoch, index)`` (:mod:`beit_scale.data.seeding`),
so a resumed run sees exactly the crops the interrupted one would have.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from beit_scale.data.folder import SkipUnreadable, load_rgb
from beit_scale.data.seeding import sample_seeds, seeded_sample

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
SPLITS = ("training", "validation")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# ImageNet mean and std in 0-255 units (the reference's img_norm_cfg)
MEAN_255 = (123.675, 116.28, 103.53)
STD_255 = (58.395, 57.12, 57.375)
_LAYOUT_HINT = "expected the ADE20K layout ROOT/images/<split>/<stem>.jpg and ROOT/annotations/<split>/<stem>.png"


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's label shift: 0 ("other") becomes ``IGNORE_INDEX``, every other class moves down by one."""
    label = label.astype(np.int64)
    out = label - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


def load_label(path: str) -> np.ndarray:
    """The class-index map of an annotation PNG, ``(H, W)`` uint8; ``ValueError`` for a colour (RGB) image."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode not in ("L", "P"):
        raise ValueError(f"annotation mode {img.mode}: it must be a single-channel class-index PNG (mode L or P)")
    return np.array(img, dtype=np.uint8)  # mode P: the palette indices are the classes


def _listing(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; {_LAYOUT_HINT}")
    files: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if not entry.is_file() or path.suffix.lower() not in extensions:
            continue
        if path.stem in files:
            raise ValueError(f"{files[path.stem].name} and {path.name} in {folder} share the stem {path.stem!r}; "
                             "keep one file per stem")
        files[path.stem] = path
    return files


class ADE20KFolder(SkipUnreadable, Dataset):
    """``(RGB PIL image, (H, W) uint8 label map)`` pairs of one split, paired by file stem, sorted by stem.

    An unreadable image or annotation, or a pair whose sizes differ, is replaced by the next readable index
    and logged once, as :class:`~beit_scale.data.folder.SafeImageFolder` does.

    Args:
        root: dataset root in the ADE20K layout.
        split: ``"training"`` or ``"validation"``.
        reduce_zero_label: apply :func:`reduce_zero_label` (ADE20K: 150 classes, 0 ignored); False for data whose
            label 0 is a real class (the Fashion-MNIST scenes' background).
        max_consecutive_failures: unreadable samples in a row tolerated before giving up.

    Raises:
        FileNotFoundError: a split folder is missing.
        ValueError: no images, or an image without annotation (or the reverse), named.
    """

    def __init__(self, root: str | Path, split: str = "training", reduce_zero_label: bool = True,
                 max_consecutive_failures: int = 32):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        self._init_skipping(max_consecutive_failures)
        self.root, self.split, self.reduce_zero_label = Path(root).expanduser(), split, reduce_zero_label
        self.transform = self.target_transform = None  # the joint transform runs in SegmentationSet
        images = _listing(self.root / "images" / split, IMAGE_EXTENSIONS)
        labels = _listing(self.root / "annotations" / split, (".png",))
        no_label, no_image = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
        if no_label or no_image:
            raise ValueError(f"{self.root} {split}: {len(no_label)} images without annotation {no_label[:5]} and "
                             f"{len(no_image)} annotations without image {no_image[:5]}; every image needs "
                             f"annotations/{split}/<stem>.png and the reverse")
        if not images:
            raise ValueError(f"{self.root / 'images' / split} holds no {'/'.join(IMAGE_EXTENSIONS)} images; "
                             f"{_LAYOUT_HINT}")
        self.samples = [(str(images[s]), str(labels[s])) for s in sorted(images)]

    def __len__(self) -> int:
        return len(self.samples)

    def _sample_name(self, index: int) -> str:
        return self.samples[index][0]

    def _read_sample(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, label_path = self.samples[index]
        image, label = load_rgb(image_path), load_label(label_path)
        if label.shape != (image.height, image.width):
            raise ValueError(f"annotation {label_path} is {label.shape[1]}x{label.shape[0]} but the image is "
                             f"{image.width}x{image.height}")
        return image, reduce_zero_label(label) if self.reduce_zero_label else label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, num_images={len(self)})"


class SegmentationSet(Dataset):
    """``{"image": (3, H, W) float, "label": (H, W) int64, "index"}`` samples of ``base`` through ``transform``.

    The transform runs with torch, numpy and Python's ``random`` seeded from ``(seed, epoch, index)``.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int):
        self.base, self.transform, self.seed, self.epoch = base, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        image, label = self.base[index]
        _, sample_seed = sample_seeds(self.seed, self.epoch, int(index))
        with seeded_sample(sample_seed):
            image, label = self.transform(image, label)
        return {"image": image, "label": label, "index": int(index)}


def rescale_size(width: int, height: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest ``(w, h)`` whose long side <= max(scale), short side <= min(scale)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _coin() -> bool:
    return bool(torch.randint(2, ()).item())


def _to_tensors(image: Image.Image | Tensor, label: np.ndarray | Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    image = TF.pil_to_tensor(image) if isinstance(image, Image.Image) else image  # (3, H, W) uint8
    label = label if isinstance(label, Tensor) else torch.from_numpy(np.array(label, dtype=np.uint8))
    return tv_tensors.Image(image), tv_tensors.Mask(label.reshape(1, *label.shape[-2:]))  # (1, H, W)


def _resize(image: Tensor, label: Optional[Tensor], width: int, height: int):
    if (height, width) == tuple(image.shape[-2:]):
        return image, label
    image = TF.resize(image, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=False)
    return image, None if label is None else TF.resize(label, [height, width])  # a Mask resizes nearest


def _convert(img: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """mmseg's ``convert``: ``x * alpha + beta`` clipped to [0, 255] and truncated to uint8 (as a float tensor)."""
    return (img * alpha + beta).clamp_(0, 255).floor_()


def _rgb_to_hsv(img: Tensor) -> Tensor:
    """(3, H, W) RGB in [0, 1] -> HSV, hue in [0, 1)."""
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = delta.clamp(min=1e-12)
    r, g, b = img
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, sat, maxc])


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    hue, sat, val = hsv
    k = torch.stack([(n + hue * 6) % 6 for n in (5.0, 3.0, 1.0)])  # (3, H, W)
    return val - val * sat * (torch.minimum(k, 4 - k).clamp(0, 1))


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` on a float (3, H, W) RGB image in 0-255, each step with probability 1/2:
    brightness (+-32), contrast (x0.5-1.5, before or after the colour steps), saturation (HSV S x0.5-1.5) and hue
    (+-18 of 180 degrees); each step truncates to 8 bits as mmseg's uint8 pipeline does."""

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    def _contrast(self, img: Tensor) -> Tensor:
        return _convert(img, alpha=_uniform(*self.contrast_range)) if _coin() else img

    def __call__(self, img: Tensor) -> Tensor:
        if _coin():
            img = _convert(img, beta=_uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = _coin()
        if contrast_first:
            img = self._contrast(img)
        if _coin():
            hsv = _rgb_to_hsv(img / 255)
            hsv[1] = (hsv[1] * _uniform(*self.saturation_range)).clamp_(0, 1)
            img = _convert(_hsv_to_rgb(hsv) * 255)
        if _coin():
            hsv = _rgb_to_hsv(img / 255)
            hsv[0] = (hsv[0] + torch.randint(-self.hue_delta, self.hue_delta, ()).item() / 180) % 1.0
            img = _convert(_hsv_to_rgb(hsv) * 255)
        if not contrast_first:
            img = self._contrast(img)
        return img


def _normalize(img: Tensor) -> Tensor:
    mean = torch.tensor(MEAN_255).view(3, 1, 1)
    std = torch.tensor(STD_255).view(3, 1, 1)
    return (img.float() - mean) / std


class SegTrainTransform:
    """The reference's training pipeline: ``(PIL image, (H, W) label) -> ((3, crop, crop) float, (crop, crop) int64)``.

    Args:
        crop_px: square crop side (512, or 640 with ``scale=(2560, 640)``).
        scale: the rescale target ``(long, short)`` before the random ratio.
        ratio_range: the random ratio of ``scale``.
        cat_max_ratio: a crop is redrawn (up to 10 times) while one class covers this share or more of its
            labelled pixels, or it holds a single class; 1.0 turns the check off.
        flip_prob: horizontal flip probability.
        photometric: apply :class:`PhotoMetricDistortion`.
    """

    def __init__(self, crop_px: int = 512, scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True):
        if not crop_px > 0 or not 0 < ratio_range[0] <= ratio_range[1] or not 0 < cat_max_ratio <= 1:
            raise ValueError(f"crop_px={crop_px} must be > 0, ratio_range={tuple(ratio_range)} increasing and > 0, "
                             f"cat_max_ratio={cat_max_ratio} in (0, 1]")
        self.crop_px, self.scale, self.ratio_range = crop_px, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob = cat_max_ratio, flip_prob
        self.photometric = PhotoMetricDistortion() if photometric else None

    def _crop_box(self, height: int, width: int) -> tuple[int, int]:
        top = int(torch.randint(max(height - self.crop_px, 0) + 1, ()).item())
        left = int(torch.randint(max(width - self.crop_px, 0) + 1, ()).item())
        return top, left

    def _balanced_crop_box(self, label: Tensor) -> tuple[int, int]:
        """mmseg's RandomCrop with ``cat_max_ratio``: redraw up to 10 times, keep the last draw."""
        height, width = label.shape[-2:]
        box = self._crop_box(height, width)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                top, left = box
                counts = torch.bincount(label[..., top:top + self.crop_px, left:left + self.crop_px].flatten().long(),
                                        minlength=IGNORE_INDEX + 1)[:IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                box = self._crop_box(height, width)
        return box

    def __call__(self, image: Image.Image | Tensor, label: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        image, mask = _to_tensors(image, label)
        ratio = _uniform(*self.ratio_range)
        width, height = rescale_size(image.shape[-1], image.shape[-2], [int(s * ratio) for s in self.scale])
        image, mask = _resize(image, mask, width, height)
        top, left = self._balanced_crop_box(mask)
        h, w = min(self.crop_px, height - top), min(self.crop_px, width - left)
        image, mask = TF.crop(image, top, left, h, w), TF.crop(mask, top, left, h, w)
        if torch.rand(()).item() < self.flip_prob:
            image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
        pixels = image.float()
        if self.photometric is not None:
            pixels = self.photometric(pixels)
        pad = (0, self.crop_px - w, 0, self.crop_px - h)  # right, bottom
        pixels = F.pad(_normalize(pixels), pad, value=0.0)
        mask = F.pad(mask.as_subclass(Tensor), pad, value=IGNORE_INDEX)
        return pixels, mask[0].long()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_px={self.crop_px}, scale={self.scale}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
                f"photometric={self.photometric is not None})")


class SegEvalTransform:
    """The reference's test pipeline: keep-ratio rescale to ``scale``, normalise; the label is left at its original
    size (``(H, W)`` int64), to score the prediction resized back to it."""

    def __init__(self, scale: Sequence[int] = (2048, 512)):
        self.scale = tuple(scale)

    def __call__(self, image: Image.Image | Tensor, label: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        image, mask = _to_tensors(image, label)
        width, height = rescale_size(image.shape[-1], image.shape[-2], self.scale)
        image, _ = _resize(image, None, width, height)
        return _normalize(image), mask.as_subclass(Tensor)[0].long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"
