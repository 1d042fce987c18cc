"""ImageNet-layout image folder that survives unreadable files.

Large crawled datasets (ImageNet-22k in particular) contain a handful of truncated, corrupt or empty files.
A single one of them must not kill a multi-day run, and skipping it must not make the data order depend on
the number of data-loader workers. `SafeImageFolder` therefore replaces a bad sample by the next readable
index (idx+1, idx+2, ... modulo the length): whether a file is readable is a property of the file, so the
same bad file always maps to the same substitute in every worker and every process.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import stat
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import simplejpeg
import torchvision
from PIL import Image
from torchvision.datasets.folder import has_file_allowed_extension

logger = logging.getLogger(__name__)

_LAYOUT_HINT = "expected the ImageNet layout ROOT/<class>/<image>.JPEG"

# What PIL raises for files it cannot decode: UnidentifiedImageError and truncation are OSErrors, some broken
# PNG chunks raise SyntaxError, a few decoders raise ValueError/EOFError, oversized images raise
# DecompressionBombError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Open an image file and fully decode it as RGB.

    PIL opens files lazily; `load()` forces the decode here so that a truncated file fails inside the
    caller's `try` instead of later in a transform.

    Args:
        path: Image file path.

    Returns:
        The decoded RGB image (grayscale, palette and alpha images are converted; 16-bit images keep their
        top 8 bits).

    Raises:
        OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError: The file is unreadable.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return _as_rgb(img)


def decode_rgb(data: bytes) -> Image.Image:
    """`load_rgb` for an image file's bytes (a member of a tar shard): same decode, same errors."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return _as_rgb(img)


_JPEG_SOI = b"\xff\xd8"
_TURBO_COLORSPACES = ("YCbCr", "Gray")  # what libjpeg-turbo converts to RGB as PIL does (not CMYK, YCCK)


def decode_rgb_array(data: bytes) -> np.ndarray:
    """`decode_rgb`'s pixels as an (H, W, 3) uint8 array, for transforms that work on arrays.

    A YCbCr or grey JPEG is decoded by libjpeg-turbo through simplejpeg straight into the array: the same
    library, exact integer IDCT and upsampling that Pillow uses, so the same pixels, without the PIL image and
    its copy out (0.5 ms less per 500x375 photo on one core). Anything else (PNG, CMYK, a JPEG over PIL's
    decompression-bomb limit, or one that libjpeg-turbo reports damaged, even recoverably) goes through
    `decode_rgb`: same pixels, same errors as the PIL path.
    """
    if data[:2] == _JPEG_SOI:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in _TURBO_COLORSPACES and height * width <= (Image.MAX_IMAGE_PIXELS or float("inf")):
                return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError:  # damaged or unsupported: PIL decides, as for every other file
            pass
    return np.asarray(decode_rgb(data))


def load_rgb_array(path: str) -> np.ndarray:
    """`load_rgb` as an (H, W, 3) uint8 array (`decode_rgb_array` of the file's bytes)."""
    with open(path, "rb") as f:
        return decode_rgb_array(f.read())


def _as_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):  # 16-bit: convert("RGB") would clip every value above 255 to white
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    elif img.mode in ("I", "F"):
        raise ValueError(f"{img.mode}-mode (32-bit) image has no agreed 8-bit range; store it with 8 or 16 bits")
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even an RGB image (70 us at 500x375)


def _special(path: str) -> bool:
    """True for a FIFO, socket or device; a broken link stays a sample (unreadable, replaced as any other)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class SkipUnreadable(abc.ABC):
    """Mixin for image datasets: an unreadable sample is replaced by the next readable index.

    The dataset names each sample (`_sample_name`, e.g. its path) and reads it (`_read_sample`, raising one of
    PIL's decode errors for a bad image); this `__getitem__` then skips unreadable samples deterministically
    (idx+1, idx+2, ... modulo the length), logs each name at WARNING once per process, records it in
    `bad_paths` (so it is not decoded again), gives up after `max_consecutive_failures` bad samples in a row,
    and applies `transform` and `target_transform` to the substitute. Call `_init_skipping` in `__init__`.
    """

    # Names already warned about in this process, shared by all instances so a name is logged only once.
    _warned_paths: ClassVar[set[str]] = set()
    root: Any
    transform: Callable[[Any], Any] | None
    target_transform: Callable[[int], Any] | None

    def _init_skipping(self, max_consecutive_failures: int) -> None:
        if max_consecutive_failures < 0:
            raise ValueError(f"max_consecutive_failures={max_consecutive_failures} must be >= 0")
        self.max_consecutive_failures = max_consecutive_failures
        self.bad_paths: set[str] = set()

    @abc.abstractmethod
    def _sample_name(self, index: int) -> str:
        """What names sample `index` in warnings, errors and `bad_paths` (a path, or a shard member)."""

    @abc.abstractmethod
    def _read_sample(self, index: int) -> tuple[Image.Image | np.ndarray, int]:
        """``(RGB image or array, class index)`` of `index`; raises one of `_DECODE_ERRORS` when it is unreadable."""

    def _mark_bad(self, name: str, err: BaseException) -> None:
        self.bad_paths.add(name)
        if name not in SkipUnreadable._warned_paths:
            SkipUnreadable._warned_paths.add(name)
            logger.warning("skipping unreadable image %s (%s: %s)", name, type(err).__name__, err)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Return ``(image, target)`` of `index`, or of the next readable index if it is unreadable.

        Raises:
            IndexError: `index` is out of range.
            RuntimeError: More than `max_consecutive_failures` consecutive images are unreadable.
        """
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        tried: list[str] = []
        for offset in range(n):
            name = self._sample_name((index + offset) % n)
            if name not in self.bad_paths:
                try:
                    img, target = self._read_sample((index + offset) % n)
                except _DECODE_ERRORS as err:
                    self._mark_bad(name, err)
                else:
                    break
            tried.append(name)
            if len(tried) > self.max_consecutive_failures:
                raise RuntimeError(
                    f"{len(tried)} consecutive images from index {index} are unreadable "
                    f"(max_consecutive_failures={self.max_consecutive_failures}); check the dataset files: "
                    f"{tried}"
                )
        else:
            raise RuntimeError(f"all {n} images under {self.root} are unreadable: {tried}")
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class SafeImageFolder(SkipUnreadable, torchvision.datasets.ImageFolder):
    """`torchvision.datasets.ImageFolder` that skips unreadable images deterministically.

    Samples are ``(image, class_index)`` as in ImageFolder, images decoded as RGB. An image that cannot be
    decoded is logged at WARNING (once per path per process), recorded in `bad_paths`, and the sample is
    replaced by the next readable index, together with that index's label.

    `bad_paths` is per process: with a multi-worker DataLoader each worker fills its own copy.

    Args:
        root: Dataset root in the ImageNet layout ``root/<class>/<image>``.
        transform: Optional transform applied to the PIL image (the array with ``arrays``).
        target_transform: Optional transform applied to the class index.
        max_consecutive_failures: How many consecutive unreadable files are tolerated before giving up.
        arrays: Decode to (H, W, 3) uint8 arrays (`decode_rgb_array`: faster for JPEGs) instead of PIL images.

    Raises:
        FileNotFoundError: `root` does not exist.
        ValueError: `root` is not a directory, has no class folders, or holds no images.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        max_consecutive_failures: int = 32,
        arrays: bool = False,
    ) -> None:
        self._init_skipping(max_consecutive_failures)
        root = Path(root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"dataset root {root} does not exist; {_LAYOUT_HINT}")
        if not root.is_dir():
            raise ValueError(f"dataset root {root} is not a directory; {_LAYOUT_HINT}")
        try:
            super().__init__(
                str(root),
                transform=transform,
                target_transform=target_transform,
                loader=load_rgb_array if arrays else load_rgb,
                allow_empty=True,
            )
        except FileNotFoundError as e:  # torchvision's "Couldn't find any class folder"
            raise ValueError(f"dataset root {root} has no class folders; {_LAYOUT_HINT}") from e
        if not self.samples:
            raise ValueError(
                f"dataset root {root} holds no images with extensions {', '.join(self.extensions)} "
                f"in its {len(self.classes)} class folders; {_LAYOUT_HINT}"
            )
        empty = sorted(set(self.classes) - {self.classes[t] for _, t in self.samples})
        if empty:
            logger.warning("%d class folders under %s hold no images: %s", len(empty), root, empty[:10])

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's listing, in the same order, made safe for folders nobody curated: a folder reached a
        second time through links (a cycle, or two class folders that are one) is read once instead of
        multiplying its images, and entries that are not regular files (a FIFO named x.jpg would block a
        loader forever) are left out. Everything left out is logged."""
        def key(folder: str) -> tuple[int, int]:
            st = os.stat(folder)
            return st.st_dev, st.st_ino

        targets = {name: os.path.join(directory, name) for name in sorted(class_to_idx)}
        targets = {name: path for name, path in targets.items() if os.path.isdir(path)}
        seen = {key(path) for path in targets.values()}  # a link into another class folder never relabels it
        repeated, special, other = [], [], []
        instances = []
        for name, target in targets.items():
            walked = []
            for root, dirs, fnames in os.walk(target, followlinks=True):
                if root != target:
                    if key(root) in seen:
                        dirs[:] = []
                        repeated.append(root)
                        continue
                    seen.add(key(root))
                walked.append((root, fnames))
            for root, fnames in sorted(walked):
                for fname in sorted(fnames):
                    path = os.path.join(root, fname)
                    valid = is_valid_file(path) if is_valid_file else has_file_allowed_extension(fname, extensions)
                    if not valid:
                        other.append(path)
                    elif _special(path):
                        special.append(path)
                    else:
                        instances.append((path, class_to_idx[name]))
        for what, paths in (("folders reached again through links (read once)", repeated),
                            ("entries that are not regular files (FIFOs, sockets, devices)", special),
                            ("files without an image extension", other)):
            if paths:
                logger.warning("%s: left out %d %s, e.g. %s", directory, len(paths), what, paths[:3])
        return instances

    def __len__(self) -> int:
        return len(self.samples)

    def _sample_name(self, index: int) -> str:
        return self.samples[index][0]

    def _read_sample(self, index: int) -> tuple[Image.Image | np.ndarray, int]:
        path, target = self.samples[index]
        return self.loader(path), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, num_images={len(self)}, num_classes={len(self.classes)})"
