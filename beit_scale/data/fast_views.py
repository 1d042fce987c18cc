"""The two-view transform at a fraction of the CPU cost: crop first, resize the crop, jitter the small views.

`TwoViewTransform` (the reference) jitters the whole image with three PIL enhancers, flips it, then resizes one
crop box twice (PIL bicubic, PIL lanczos): about 6 ms per 500x375 photo on one core, five times the JPEG decode.
`FastTwoViewTransform` makes the same draws from torch's global RNG in the same order (jitter order and factors,
flip, crop box from `RandomResizedCrop.get_params`) and cuts both views from the same box, but

- takes the box out of the unjittered image and resizes it with torch's antialiased bicubic on uint8 (PIL's
  filter and weights; within one grey level of PIL's, a few levels at some pixels where one side is enlarged
  and the other reduced, as the two libraries clip the intermediate pass in a different order); a flip mirrors
  the resized view, which is the same as resizing the mirrored box;
- applies brightness, contrast and saturation to the resized view instead of the whole image, in float, as
  colour maps composed into as few passes as the clipping allows (`_Plan`) and fused with the normalisation;
  PIL's clip to [0, 255] after each enhancer is kept wherever it can bind, PIL's truncation to integers is
  emulated by -0.5 per enhancer; a box that the resize enlarges on both sides (fewer pixels than the view) is
  jittered before the resize instead, in the reference's order;
- reads contrast's grey mean (PIL's: the rounded mean grey of the whole image after the enhancers before it)
  from every k-th pixel of the image in each direction (about 4,096 pixels) with those enhancers applied in
  PIL's arithmetic: within one grey level of PIL's on photos; from every pixel of images under 16,384 pixels
  (Fashion-MNIST's), equal to PIL's but at rounding ties (PIL averages per-pixel rounded greys);
- makes the tokenizer view of a box larger than it, when the patch view's side is a multiple k of it, as the
  k x k box average of the jittered patch view (the reference: lanczos from the box), else as a second bicubic
  resize of the box; a box smaller than both views gets the reference's lanczos (cheap on so few pixels).

Pixel differences to the reference come only from these steps; tests/unit/test_fast_views.py bounds them on
photos and Fashion-MNIST images. benchmarks/input_pipeline.py measures the speed.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import ColorJitter, RandomResizedCrop

from beit_scale.data.transforms import TwoViewTransform, _as_rgb

# Pillow's RGB -> L weights (ITU-R 601-2 luma in 16-bit fixed point; they sum to 1): the grey that
# ImageEnhance.Color blends with and ImageEnhance.Contrast averages.
GREY_FIXED = (19595, 38470, 7471)
GREY = tuple(w / 65536 for w in GREY_FIXED)
_GREY32 = np.array(GREY, dtype=np.float32)
MEAN_SAMPLE_PX = 4096  # contrast's grey mean is read from about this many pixels of the whole image
BIND_TOLERANCE = 1.0  # grey levels: an intermediate clip that can move no pixel by more is not applied


class FastTwoViewTransform(TwoViewTransform):
    """`TwoViewTransform`'s augmentation with the crop and resize before the colour jitter (see the module doc).

    Same arguments, same draws from torch's global RNG (so `MIMDataset`'s per-sample seeding gives the same
    crop box, flip and jitter factors as the reference), same outputs: ``(patch_view, tokenizer_view)``, float
    (3, img_size, img_size) normalised with mean/std and (3, tokenizer_size, tokenizer_size) in [0, 1] passed
    through `tokenizer_pixel_map`. Pixels differ from the reference's by about one grey level on average.
    """

    def __init__(self, *args, defer: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        v = self._views
        self.defer = defer
        # the tokenizer view from the patch view when its side divides the patch view's (0: a resize of its own)
        self._box = v.img_size // v.tokenizer_size if v.img_size % v.tokenizer_size == 0 else 0
        self._mean = torch.tensor(v.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(v.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, img: Image.Image | np.ndarray) -> tuple[Tensor, ...]:
        """``img``: a PIL image, or an (H, W, 3) uint8 RGB array (a dataset's ``arrays=True``: no PIL copy).

        Returns ``(patch_view, tokenizer_view)`` as `TwoViewTransform` does; with ``defer``, the views before
        the colour maps instead: ``(patch uint8 (3, S, S), tokenizer uint8 (3, T, T), plan float32 (PLAN_SIZE,))``,
        a quarter of the bytes to move, for `finish` to complete on the training device (`finish_batch`).
        """
        patch, tok, plan = self._deferred(img)
        if self.defer:
            return patch, tok, plan
        patch_view, tok_view = self.finish(patch[None], tok[None], plan[None])
        return patch_view[0], tok_view[0]

    def _deferred(self, img: Image.Image | np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        pixels = _rgb_pixels(img)  # (H, W, 3) uint8, maybe read-only
        segments = self._draw_jitter(pixels) if self.color_jitter is not None else [_IDENTITY]
        flip = self.hflip > 0 and torch.rand(1).item() < self.hflip
        img_h, img_w = pixels.shape[:2]
        # the draws of get_params, which reads only the size: a (3, H, W) view of one byte stands in for the image
        top, left, height, width = RandomResizedCrop.get_params(
            torch.empty((), dtype=torch.uint8).expand(3, img_h, img_w), list(self.scale), list(self.ratio))
        if flip:  # the box was drawn on the mirrored image
            left = img_w - left - width
        crop = pixels[top:top + height, left:left + width].copy()  # (h, w, 3), writable
        v = self._views
        enlarged = height <= v.img_size and width <= v.img_size  # fewer pixels than the view: the reference's order
        if enlarged and segments != [_IDENTITY]:
            crop, segments = _jitter_pixels(crop, segments), [_IDENTITY]
        x = torch.from_numpy(crop).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8, channels-last
        patch = _resize(x, v.img_size, flip)
        from_patch = 0.0
        if enlarged and max(height, width) <= v.tokenizer_size:  # enlarged again: the reference's lanczos, cheap
            tok = Image.fromarray(crop).resize((v.tokenizer_size,) * 2, Image.Resampling.LANCZOS)  # on a small box
            tok = tok.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else tok
            tok = torch.from_numpy(np.asarray(tok).transpose(2, 0, 1).copy())
        elif self._box:  # `finish` box-averages the jittered patch view to the tokenizer view's size
            tok, from_patch = torch.zeros((3, v.tokenizer_size, v.tokenizer_size), dtype=torch.uint8), 1.0
        else:
            tok = _resize(x, v.tokenizer_size, flip)
        return patch, tok, _plan_tensor(segments, from_patch)

    def finish(self, patch: Tensor, tok: Tensor, plan: Tensor,
               hints: "PlanHints | None" = None) -> tuple[Tensor, Tensor]:
        """Deferred views (``(B, 3, S, S)`` and ``(B, 3, T, T)`` uint8, ``(B, PLAN_SIZE)`` plans, on any device) ->
        ``(patch views, tokenizer views)``: float32, normalised with mean/std and in the tokenizer's pixel map.
        ``hints``: `PlanHints` of the plans while they were on the CPU (read there without a device sync)."""
        if hints is None:
            hints = PlanHints.of(plan.cpu())  # a device sync where plans are on one (finish_batch reads them first)
        x = _apply_plan(patch.float(), plan, hints.slots)  # (B, 3, S, S) in [0, 255]
        own = _apply_plan(tok.float(), plan, hints.slots) if hints.own_tokenizer_view else None
        if self._box:
            boxed = F.avg_pool2d(x, self._box) if self._box > 1 else x.clone()
            tok_view = boxed if own is None else torch.where(plan[:, 0].view(-1, 1, 1, 1) > 0.5, boxed, own)
        else:
            tok_view = own
        mean, std = self._mean.to(x.device), self._std.to(x.device)
        patch_view = x.mul_(1 / 255).sub_(mean).div_(std)
        return patch_view, self._views.tokenizer_pixel_map(tok_view.mul_(1 / 255).clamp_(0.0, 1.0))

    def _draw_jitter(self, pixels: np.ndarray) -> list[Segment]:
        """ColorJitter's draws (the same calls as the reference's), as the segments of colour maps to apply."""
        cj = self.color_jitter
        order, b, c, s, _ = ColorJitter.get_params(cj.brightness, cj.contrast, cj.saturation, None)
        plan = _Plan()
        done: list[tuple[int, float]] = []
        for op in order.tolist():
            if op == 0 and b is not None:  # Image.blend(black, x, b) = floor(b x)
                plan.add(b, 0.0, -0.5)
                done.append((op, b))
            elif op == 1 and c is not None:  # floor(mean + c (x - mean))
                plan.add(c, 0.0, (1 - c) * _grey_mean(pixels, done) - 0.5)
                done.append((op, c))
            elif op == 2 and s is not None:  # floor(grey(x) + s (x - grey(x)))
                plan.add(s, 1 - s, -0.5)
                done.append((op, s))
        return plan.segments()


def _rgb_pixels(img: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a PIL image (any mode `_as_rgb` takes) or of an RGB array."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise TypeError(f"expected an (H, W, 3) uint8 RGB array, got {img.dtype} {img.shape}; decode images "
                            "with decode_rgb_array or a dataset's arrays=True")
        return img
    img = _as_rgb(img)
    return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(img.height, img.width, 3)  # read-only


# A colour map y = alpha x + beta grey(x) + gamma (the same for every channel; PIL's truncation to integers
# emulated by gamma -= 0.5 per enhancer), then a clip of y to [lo, hi].
Segment = tuple[float, float, float, float, float]  # (alpha, beta, gamma, lo, hi)
MAX_SEGMENTS = 3  # one per enhancer at most (`_Plan`)
PLAN_SIZE = 1 + 5 * MAX_SEGMENTS  # a deferred sample's plan: tokenizer view from the patch view (1.0) or not, segments
_IDENTITY: Segment = (1.0, 0.0, 0.0, 0.0, 255.0)


class _Plan:
    """Enhancers composed into as few passes over the pixels as the clipping allows.

    Each enhancer is a colour map then PIL's clip to [0, 255]. A clip followed by a map that scales every channel
    alike (brightness, contrast; factor > 0) equals the map followed by a clip to the mapped interval, so those
    compose into one segment. Only a channel-mixing map (saturation) after a clip that can bind needs the pixels
    clipped first, which ends a segment.
    """

    def __init__(self) -> None:
        self.done: list[Segment] = []
        self.alpha, self.beta, self.gamma, self.lo, self.hi = _IDENTITY

    def add(self, alpha: float, beta: float, gamma: float) -> None:
        """Then the map ``alpha x + beta grey(x) + gamma`` and PIL's clip to [0, 255]."""
        if beta != 0.0:
            if self._clip_binds():
                self.done.append(self._segment())
                self.alpha, self.beta, self.gamma, self.lo, self.hi = _IDENTITY
            self.lo, self.hi = 0.0, 255.0  # the earlier clip does not bind: only this map's own
        else:
            self.lo, self.hi = (min(max(alpha * bound + gamma, 0.0), 255.0) for bound in (self.lo, self.hi))
        # (alpha, beta, gamma) after (a, b, g), with grey(a x + b grey(x) + g) = (a + b) grey(x) + g
        a, b, g = self.alpha, self.beta, self.gamma
        self.alpha, self.beta, self.gamma = alpha * a, alpha * b + beta * (a + b), (alpha + beta) * g + gamma

    def _clip_binds(self) -> bool:
        """Whether clipping y to [lo, hi] can move y by more than BIND_TOLERANCE for some x in [0, 255]^3."""
        for c in range(3):  # y_c = sum_j coef_j x_j + gamma
            coefs = [self.alpha * (j == c) + self.beta * GREY[j] for j in range(3)]
            low = self.gamma + 255 * sum(min(k, 0.0) for k in coefs)
            high = self.gamma + 255 * sum(max(k, 0.0) for k in coefs)
            if low < self.lo - BIND_TOLERANCE or high > self.hi + BIND_TOLERANCE:
                return True
        return False

    def _segment(self) -> Segment:
        return self.alpha, self.beta, self.gamma, self.lo, self.hi

    def segments(self) -> list[Segment]:
        return [*self.done, self._segment()]


def _resize(x: Tensor, size: int, flip: bool) -> Tensor:
    """(1, 3, h, w) channels-last uint8 -> (3, size, size) uint8: torch's antialiased bicubic, PIL's weights (its
    vectorised uint8 kernel takes channels-last input). ``flip``: mirrored, which is the same as resizing the
    mirrored box (the filter is symmetric)."""
    out = F.interpolate(x, (size, size), mode="bicubic", antialias=True)[0]
    return (out.flip(-1) if flip else out).contiguous()


def _plan_tensor(segments: list[Segment], from_patch: float) -> Tensor:
    """(PLAN_SIZE,) float32: ``from_patch``, then the segments padded with identities (no pixel in range moves)."""
    if len(segments) > MAX_SEGMENTS:
        raise AssertionError(f"{len(segments)} colour segments, at most {MAX_SEGMENTS} expected")
    segments = segments + [_IDENTITY] * (MAX_SEGMENTS - len(segments))
    return torch.tensor([from_patch, *(value for seg in segments for value in seg)], dtype=torch.float32)


class PlanHints(NamedTuple):
    """What a batch's plans need, read while they are on the CPU (on a device it would cost a sync)."""
    slots: list[tuple[int, bool]]  # (slot, mixes channels) of the segment slots not the identity for every sample
    own_tokenizer_view: bool  # some sample's tokenizer view is its own (not the patch view box-averaged)

    @classmethod
    def of(cls, plan: Tensor) -> "PlanHints":
        """Read from a CPU ``plan`` through numpy: host memory, never a device sync."""
        p = plan.numpy()
        seg = p[:, 1:].reshape(-1, MAX_SEGMENTS, 5)
        identity = np.array(_IDENTITY, dtype=p.dtype)
        return cls([(i, bool((seg[:, i, 1] != 0).any())) for i in range(MAX_SEGMENTS) if (seg[:, i] != identity).any()],
                   bool((p[:, 0] < 0.5).any()))


def _apply_plan(x: Tensor, plan: Tensor, slots: list[tuple[int, bool]] | None = None) -> Tensor:
    """(B, 3, H, W) float pixels in [0, 255] through each sample's segments, in place: ``clip(alpha x + beta grey(x)
    + gamma, lo, hi)`` in turn (``plan[:, 1:]``, MAX_SEGMENTS x 5 values a sample); ``slots`` (`PlanHints.slots`)
    skips those that are the identity for every sample and the grey where no sample mixes channels."""
    seg = plan[:, 1:].reshape(-1, MAX_SEGMENTS, 5, 1, 1, 1)  # (B, segment, value, 1, 1, 1)
    for i, mixes in slots if slots is not None else [(i, True) for i in range(MAX_SEGMENTS)]:
        alpha, beta, gamma, lo, hi = seg[:, i].unbind(1)  # each (B, 1, 1, 1)
        if mixes:
            grey = torch.add(x[:, 0:1] * GREY[0], x[:, 1:2], alpha=GREY[1]).add_(x[:, 2:3], alpha=GREY[2])
            x.mul_(alpha).add_(grey.mul_(beta).add_(gamma))  # grey: (B, 1, H, W)
        else:
            x.mul_(alpha).add_(gamma)
        if x.device.type == "cpu":  # a clamp to per-sample bounds broadcast is 15x slower there than to numbers
            for sample, low, high in zip(x, lo.flatten().numpy(), hi.flatten().numpy()):  # host memory: no sync
                sample.clamp_(float(low), float(high))
        else:
            torch.clamp(x, lo, hi, out=x)
    return x


def _jitter_pixels(pixels: np.ndarray, segments: list[Segment]) -> np.ndarray:
    """The segments on (h, w, 3) uint8 pixels, back to uint8 as PIL's last enhancer leaves them (truncated)."""
    x = pixels.reshape(-1, 3)  # (n, 3)
    for alpha, beta, gamma, lo, hi in segments:
        if beta:  # x @ (alpha I + beta 1 grey^T)^T
            M = (alpha * np.eye(3) + beta * np.outer(np.ones(3), GREY)).T.astype(np.float32)
            x = np.matmul(x, M, dtype=np.float32)
        else:
            x = np.multiply(x, np.float32(alpha), dtype=np.float32)
        x += np.float32(gamma)
        np.clip(x, lo, hi, out=x)
    x += 0.5  # gamma holds -0.5 for the truncation: floor(exact) = floor(x + 0.5), x >= 0
    return x.astype(np.uint8).reshape(pixels.shape)


def _grey_mean(pixels: np.ndarray, done: list[tuple[int, float]]) -> int:
    """ImageEnhance.Contrast's rounded grey mean of the (H, W, 3) image after the enhancers ``done`` (with PIL's
    arithmetic), read from every k-th pixel in each direction: about MEAN_SAMPLE_PX pixels."""
    h, w, _ = pixels.shape
    k = max(1, math.isqrt(h * w // MEAN_SAMPLE_PX))
    # (n, 3) uint8; copied as 3-byte items, twice as fast as numpy's byte loop over a strided (h, w, 3)
    x = pixels.view(np.dtype("V3"))[:, :, 0][k // 2::k, k // 2::k].copy().view(np.uint8).reshape(-1, 3)
    for op, f in done:  # Image.blend(base, x, f): float32 base + f (x - base), clipped to [0, 255], truncated
        if op == 0:  # Brightness: base black
            x = np.floor(np.minimum(x * np.float32(f), 255))
        else:  # Color: base Pillow's L, round(grey) (its weights are multiples of 2^-16: exact in float32)
            grey = np.floor(np.dot(x, _GREY32) + 0.5)[:, None]
            x = x - grey
            x *= np.float32(f)
            x += grey
            np.floor(np.clip(x, 0, 255, out=x), out=x)
    # the mean of Pillow's L (rounded per pixel) taken as the mean of the unrounded grey: within 0.01 level
    return int(float(np.dot(x, _GREY32).sum(dtype=np.float64)) / len(x) + 0.5)


TRANSFORMS = {"fast": FastTwoViewTransform, "reference": TwoViewTransform}  # data.transform


def two_view_transform(kind: str, img_size: int, tokenizer_size: int, **kwargs) -> TwoViewTransform:
    """The training two-view transform ``data.transform`` names (``fast`` or ``reference``), built with
    `TwoViewTransform`'s arguments. ``fast`` defers its colour maps to `finish_batch` (uint8 views leave the
    loader workers) and reads arrays (`takes_arrays`)."""
    if kind not in TRANSFORMS:
        raise ValueError(f"data.transform={kind!r} must be one of {', '.join(TRANSFORMS)}")
    if kind == "fast":
        return FastTwoViewTransform(img_size, tokenizer_size, defer=True, **kwargs)
    return TRANSFORMS[kind](img_size, tokenizer_size, **kwargs)


def takes_arrays(transform) -> bool:
    """Whether ``transform`` reads (H, W, 3) uint8 arrays, so its dataset should decode with ``arrays=True``."""
    return isinstance(transform, FastTwoViewTransform)


def finish_batch(batch: dict, transform, device: torch.device) -> dict:
    """A loader batch with its views finished on ``device``: the deferred ones (a ``view_plan`` entry, from a
    ``defer`` `FastTwoViewTransform`) through `FastTwoViewTransform.finish` there, batched; others moved as
    they are. ``image`` and ``tokenizer_view`` come back float32 on ``device``."""
    if "view_plan" not in batch:
        return {**batch, "image": batch["image"].to(device, non_blocking=True),
                "tokenizer_view": batch["tokenizer_view"].to(device, non_blocking=True)}
    out = {k: v for k, v in batch.items() if k != "view_plan"}
    plan = batch["view_plan"]
    out["image"], out["tokenizer_view"] = transform.finish(batch["image"].to(device, non_blocking=True),
                                                           batch["tokenizer_view"].to(device, non_blocking=True),
                                                           plan.to(device, non_blocking=True), PlanHints.of(plan))
    return out
