"""Two-view transforms for BEiT masked image modeling (arXiv 2106.08254, section 2.5).

The backbone sees the *patch view* (e.g. 224 px, normalised with mean/std); the tokenizer sees the
*tokenizer view* (e.g. 112 px, in its own pixel mapping) of exactly the same pixels, so that the visual token
at each position describes the patch the backbone must predict. Both views therefore share one colour
jitter, one flip and one crop box; only the final resize differs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.transforms import ColorJitter, InterpolationMode, RandomResizedCrop

PixelMap = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def _check_sizes(img_size: int, tokenizer_size: int) -> None:
    for name, value in (("img_size", img_size), ("tokenizer_size", tokenizer_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive number of pixels, e.g. 224 or 112")


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} need one value per RGB channel")
    if min(std) <= 0:
        raise ValueError(f"std={tuple(std)} must be > 0 in every channel")


class _Views:
    """Shared tail of both transforms: one crop box of a PIL image -> (patch view, tokenizer view)."""

    def __init__(
        self,
        img_size: int,
        tokenizer_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        tokenizer_pixel_map: PixelMap | None,
    ) -> None:
        _check_sizes(img_size, tokenizer_size)
        _check_mean_std(mean, std)
        self.img_size = img_size
        self.tokenizer_size = tokenizer_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.tokenizer_pixel_map = tokenizer_pixel_map if tokenizer_pixel_map is not None else _identity

    def views(self, img: Image.Image, top: int, left: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        patch = TF.resized_crop(
            img, top, left, height, width, [self.img_size, self.img_size], InterpolationMode.BICUBIC
        )
        patch_view = TF.normalize(TF.to_tensor(patch), self.mean, self.std)  # (3, img_size, img_size)
        tok = TF.resized_crop(
            img, top, left, height, width, [self.tokenizer_size, self.tokenizer_size], InterpolationMode.LANCZOS
        )
        tok_view = self.tokenizer_pixel_map(TF.to_tensor(tok).clamp_(0.0, 1.0))  # (3, tok_size, tok_size)
        return patch_view, tok_view


def _as_rgb(img: Image.Image) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}; load images with SafeImageFolder")
    return img if img.mode == "RGB" else img.convert("RGB")


class TwoViewTransform:
    """Random two-view augmentation for BEiT pretraining.

    Colour jitter, horizontal flip and a random resized crop box are drawn once, in that order (as in the
    BEiT reference code), and the box is resized twice: bicubic to `img_size` for the patch view, lanczos
    (antialiased) to `tokenizer_size` for the tokenizer view. All randomness comes from torch's global RNG,
    so `torch.manual_seed` (or `MIMDataset`'s per-sample seeding) fixes the result.

    Args:
        img_size: Side of the patch view in pixels.
        tokenizer_size: Side of the tokenizer view in pixels.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
        hflip: Probability of a horizontal flip.
        color_jitter: Strength of brightness, contrast and saturation jitter; 0 disables it.
        mean: Per-channel mean for normalising the patch view.
        std: Per-channel std for normalising the patch view.
        tokenizer_pixel_map: Maps tokenizer-view pixels from [0, 1] to the tokenizer's input range, e.g.
            DALL-E's ``lambda x: (1 - 2 * eps) * x + eps``; identity if None.
    """

    def __init__(
        self,
        img_size: int,
        tokenizer_size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        tokenizer_pixel_map: PixelMap | None = None,
    ) -> None:
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale={tuple(scale)} must satisfy 0 < min <= max, e.g. (0.08, 1.0)")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio={tuple(ratio)} must satisfy 0 < min <= max, e.g. (3/4, 4/3)")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip={hflip} is a probability and must be in [0, 1]")
        if color_jitter < 0:
            raise ValueError(f"color_jitter={color_jitter} must be >= 0 (0 disables it)")
        self._views = _Views(img_size, tokenizer_size, mean, std, tokenizer_pixel_map)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        # ColorJitter(0, 0, 0) would still consume RNG for its op order; skip it entirely instead.
        self.color_jitter = ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        """Augment one image.

        Args:
            img: PIL image (converted to RGB if needed).

        Returns:
            ``(patch_view, tokenizer_view)``: float tensors of shape (3, img_size, img_size), normalised, and
            (3, tokenizer_size, tokenizer_size), clamped to [0, 1] then passed through `tokenizer_pixel_map`.
        """
        img = _as_rgb(img)
        if self.color_jitter is not None:
            img = self.color_jitter(img)
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            img = TF.hflip(img)
        top, left, height, width = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        return self._views.views(img, top, left, height, width)

    def __repr__(self) -> str:
        v = self._views
        return (
            f"{type(self).__name__}(img_size={v.img_size}, tokenizer_size={v.tokenizer_size}, "
            f"scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, color_jitter={self.color_jitter})"
        )


class EvalTwoView:
    """Deterministic two-view transform for held-out evaluation.

    Takes the centred square of side ``crop_pct * min(width, height)`` (what ``Resize(img_size / crop_pct)``
    followed by ``CenterCrop(img_size)`` keeps) and resizes that one box to both view sizes.

    Args:
        img_size: Side of the patch view in pixels.
        tokenizer_size: Side of the tokenizer view in pixels.
        crop_pct: Fraction of the shorter image side kept by the centre crop.
        mean: Per-channel mean for normalising the patch view.
        std: Per-channel std for normalising the patch view.
        tokenizer_pixel_map: Maps tokenizer-view pixels from [0, 1] to the tokenizer's range; identity if None.
    """

    def __init__(
        self,
        img_size: int,
        tokenizer_size: int,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        tokenizer_pixel_map: PixelMap | None = None,
    ) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct={crop_pct} must be in (0, 1], e.g. 0.875 (224 of 256 px)")
        self._views = _Views(img_size, tokenizer_size, mean, std, tokenizer_pixel_map)
        self.crop_pct = float(crop_pct)

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        """Return ``(patch_view, tokenizer_view)`` with the same shapes and ranges as `TwoViewTransform`."""
        img = _as_rgb(img)
        width, height = img.size
        side = max(1, round(self.crop_pct * min(width, height)))
        top = int(math.floor((height - side) / 2))
        left = int(math.floor((width - side) / 2))
        return self._views.views(img, top, left, side, side)

    def __repr__(self) -> str:
        v = self._views
        return (
            f"{type(self).__name__}(img_size={v.img_size}, tokenizer_size={v.tokenizer_size}, "
            f"crop_pct={self.crop_pct})"
        )
