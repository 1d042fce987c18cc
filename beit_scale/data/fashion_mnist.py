"""Find Fashion-MNIST (a folder, Debian's dataset-fashion-mnist, or torchvision's download) and export it to ImageFolder.

Gives the quickstart recipes and tests a small real dataset in the same layout as ImageNet, so the whole
pipeline (SafeImageFolder -> TwoViewTransform -> MIMDataset) runs unchanged on it.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CLASS_NAMES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
DEFAULT_SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
TORCHVISION_SUBDIR = Path("FashionMNIST/raw")  # where torchvision.datasets.FashionMNIST(root) puts the files
IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MARKER_NAME = ".export_complete.json"

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803  # idx3: unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # idx1: unsigned byte, 1 dimension


def _idx_file(folder: Path, name: str) -> Path | None:
    """``name`` gzipped (as published and as Debian ships it) or not (as torchvision also leaves it)."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _source_files(source_dir: Path, split: str) -> tuple[Path, Path]:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split={split!r} must be one of {sorted(_SPLIT_PREFIX)}")
    prefix = _SPLIT_PREFIX[split]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    for folder in (source_dir, source_dir / TORCHVISION_SUBDIR):
        found = [_idx_file(folder, name) for name in names]
        if all(found):
            return found[0], found[1]
    raise FileNotFoundError(
        f"Fashion-MNIST files not found in {source_dir}: need {names[0]}.gz and {names[1]}.gz (or unzipped); "
        "install them with `apt-get install dataset-fashion-mnist` (as root), or download them from "
        f"{FASHION_MNIST_URL} into a folder and name it"
    )


def has_fashion_mnist(source_dir: Path) -> bool:
    """True when ``source_dir`` holds both splits (the idx files, gzipped or not, or torchvision's layout)."""
    try:
        for split in _SPLIT_PREFIX:
            _source_files(Path(source_dir), split)
    except FileNotFoundError:
        return False
    return True


def find_fashion_mnist(data_dir: Path | None, download_dir: Path, debian_dir: Path = DEFAULT_SOURCE_DIR) -> Path:
    """The folder of Fashion-MNIST's idx files: the one given, else Debian's package, else a download.

    Args:
        data_dir: A folder the user named; used alone, and an error if it lacks the files.
        download_dir: Where torchvision's download goes when neither the given folder nor Debian's package has
            them (the network may not allow it).
        debian_dir: Where Debian's dataset-fashion-mnist puts them.

    Raises:
        ValueError: Nothing found, with what to do.
    """
    if data_dir is not None:
        if not has_fashion_mnist(Path(data_dir)):
            raise ValueError(
                f"--data {data_dir} does not hold Fashion-MNIST: it needs {', '.join(IDX_NAMES)} (each .gz or "
                f"unzipped), as published at {FASHION_MNIST_URL}, or torchvision's {TORCHVISION_SUBDIR} folder")
        logger.info("Fashion-MNIST: the folder you named, %s", data_dir)
        return Path(data_dir)
    if has_fashion_mnist(debian_dir):
        logger.info("Fashion-MNIST: Debian's package dataset-fashion-mnist in %s", debian_dir)
        return Path(debian_dir)
    if has_fashion_mnist(download_dir):
        logger.info("Fashion-MNIST: an earlier download in %s", download_dir)
        return download_dir
    logger.info("Fashion-MNIST: not in %s; downloading it with torchvision into %s", debian_dir, download_dir)
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(download_dir), train=train, download=True)
    except Exception as err:  # noqa: BLE001 - any network or archive failure gets the same advice
        raise ValueError(
            f"Fashion-MNIST is not on this machine and torchvision could not download it ({str(err).strip()[:300]}). "
            f"Either download {', '.join(IDX_NAMES)} from {FASHION_MNIST_URL} into a folder and pass --data FOLDER, "
            "or, as root, `apt-get install dataset-fashion-mnist`") from None
    logger.info("Fashion-MNIST: downloaded by torchvision into %s", download_dir)
    return download_dir


@contextlib.contextmanager
def _open_idx(path: Path) -> Iterator[BinaryIO]:
    """The idx file, gunzipped on the fly; a damaged file (e.g. a web page saved as .gz) is a ValueError naming it."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            yield f
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} cannot be read as an idx file ({err}); download it again") from None


def _read_header(f: BinaryIO, path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    header = np.frombuffer(f.read(4 * (1 + ndim)), dtype=">u4")
    if header.size != 1 + ndim or int(header[0]) != magic:
        raise ValueError(f"{path} is not an idx file with magic {magic:#010x}; re-install the dataset")
    return tuple(int(d) for d in header[1:])


def read_idx_images(path: Path, limit: int | None = None) -> np.ndarray:
    """Decode the first `limit` images of a gzip idx3 file.

    Returns:
        uint8 array (n, rows, cols).
    """
    with _open_idx(path) as f:
        n, rows, cols = _read_header(f, path, _IMAGES_MAGIC, 3)
        n = n if limit is None else min(n, limit)
        data = np.frombuffer(f.read(n * rows * cols), dtype=np.uint8)
    if data.size != n * rows * cols:
        raise ValueError(f"{path} is truncated: expected {n} images of {rows}x{cols}; re-install the dataset")
    return data.reshape(n, rows, cols)


def read_idx_labels(path: Path, limit: int | None = None) -> np.ndarray:
    """Decode the first `limit` labels of a gzip idx1 file.

    Returns:
        int64 array (n,).
    """
    with _open_idx(path) as f:
        (n,) = _read_header(f, path, _LABELS_MAGIC, 1)
        n = n if limit is None else min(n, limit)
        data = np.frombuffer(f.read(n), dtype=np.uint8)
    if data.size != n:
        raise ValueError(f"{path} is truncated: expected {n} labels; re-install the dataset")
    return data.astype(np.int64)


def _read_marker(split_dir: Path) -> int | None:
    try:
        return int(json.loads((split_dir / MARKER_NAME).read_text())["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_fashion_mnist(
    out_root: Path,
    split: str = "train",
    limit: int | None = None,
    source_dir: Path = DEFAULT_SOURCE_DIR,
) -> Path:
    """Write Fashion-MNIST images as PNG files in ImageFolder layout.

    Files are ``out_root/<split>/<class_name>/<index:05d>.png`` (28x28 grayscale) for the first `limit`
    images of the split. A marker file holding the count is written last; when it already matches, nothing
    is rewritten. Otherwise the class folders are removed and the split is exported again. Call it from one
    process only (rank zero) and wait for it before other ranks read the folder.

    ImageFolder numbers the class folders alphabetically, so its class indices differ from the Fashion-MNIST
    label ids (``ds.classes[i]`` gives the name; `CLASS_NAMES` is in label-id order).

    Args:
        out_root: Folder that receives the ``<split>`` folder.
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images, the t10k files).
        limit: Export only the first `limit` images; all if None.
        source_dir: Folder holding the ``*-idx*-ubyte.gz`` files.

    Returns:
        The split's folder ``out_root/<split>``, ready for `SafeImageFolder`.

    Raises:
        FileNotFoundError: The source files are missing (install ``dataset-fashion-mnist``).
        ValueError: Unknown split, or `limit` is not in [1, size of the split].
    """
    images_path, labels_path = _source_files(Path(source_dir), split)
    with _open_idx(images_path) as f:
        (available, _, _) = _read_header(f, images_path, _IMAGES_MAGIC, 3)
    if limit is not None and not 1 <= limit <= available:
        raise ValueError(f"limit={limit} must be in [1, {available}] for the {split} split, or None for all")
    count = available if limit is None else limit

    split_dir = Path(out_root) / split
    if _read_marker(split_dir) == count:
        logger.debug("Fashion-MNIST %s already exported to %s (%d images)", split, split_dir, count)
        return split_dir
    images = read_idx_images(images_path, count)  # (count, 28, 28)
    labels = read_idx_labels(labels_path, count)  # (count,)
    if len(labels) != count:
        raise ValueError(f"{labels_path} holds {len(labels)} labels for {count} images; re-install the dataset")

    # Remove only what this function writes, so stale images from a larger export cannot leak in.
    (split_dir / MARKER_NAME).unlink(missing_ok=True)
    for name in CLASS_NAMES:
        shutil.rmtree(split_dir / name, ignore_errors=True)
    class_dirs = [split_dir / name for name in CLASS_NAMES]
    for d in class_dirs:
        d.mkdir(parents=True, exist_ok=True)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        Image.fromarray(pixels).save(class_dirs[label] / f"{i:05d}.png", compress_level=1)

    tmp = split_dir / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps({"split": split, "count": count}))
    os.replace(tmp, split_dir / MARKER_NAME)
    logger.info("exported %d Fashion-MNIST %s images to %s", count, split, split_dir)
    return split_dir
