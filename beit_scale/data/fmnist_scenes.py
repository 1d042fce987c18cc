"""A small real segmentation set: scenes of Fashion-MNIST items, exported in the ADE20K layout.

Each scene is a ``canvas_px`` square black canvas with 2 to 4 real Fashion-MNIST items pasted at random positions
and scales, each tinted with a random colour (or kept grey: ``tint=False``, the pixels Fashion-MNIST pretraining
sees); later items paint over earlier ones (occlusion). An item's pixels
brighter than ``threshold`` (0-255, before tinting) are labelled with its class + 1; the rest of the canvas is
background, label 0. So the set has **11 classes with background a real class: read it with
``reduce_zero_label=False`` and ``num_classes=11``** (:data:`SCENE_CLASSES` names them).

Training scenes draw items from the Fashion-MNIST training split, validation scenes from its test split; scene
``i`` of a split is a pure function of ``(seed, split, i)`` (:func:`compose_scene`), so an interrupted export
resumes where it stopped and two exports with one seed are identical.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from beit_scale.data.fashion_mnist import (CLASS_NAMES, DEFAULT_SOURCE_DIR, _source_files, read_idx_images,
                                           read_idx_labels)

logger = logging.getLogger(__name__)

SCENE_CLASSES = ("background",) + CLASS_NAMES
MARKER_NAME = ".export_complete.json"
PROGRESS_NAME = ".export_in_progress.json"
_FORMAT = 1  # bump when compose_scene changes what a seed produces
_SOURCE_SPLIT = {"training": "train", "validation": "test"}
_SPLIT_KEY = {"training": 0, "validation": 1}


def compose_scene(rng: np.random.Generator, items: np.ndarray, classes: np.ndarray, canvas_px: int = 64,
                  num_items: tuple[int, int] = (2, 4), scale_range: tuple[float, float] = (0.75, 1.5),
                  threshold: int = 64, tint: bool = True) -> tuple[np.ndarray, np.ndarray, list[dict[str, int]]]:
    """One scene drawn with ``rng`` from the pool ``items`` ``(n, 28, 28)`` uint8 with labels ``classes`` ``(n,)``.

    ``tint=False`` paints the items grey (R = G = B); the random draws are the same, so the scene has the same
    items, positions, sizes and labels as with ``tint=True``.

    Returns:
        ``(image (canvas, canvas, 3) uint8, label (canvas, canvas) uint8, placed)``, ``placed`` listing each item
        in painting order as ``{"pool_index", "class", "top", "left", "size"}``.
    """
    image = np.zeros((canvas_px, canvas_px, 3), np.uint8)
    label = np.zeros((canvas_px, canvas_px), np.uint8)
    placed = []
    for _ in range(int(rng.integers(num_items[0], num_items[1] + 1))):
        j = int(rng.integers(len(items)))
        size = min(int(round(28 * rng.uniform(*scale_range))), canvas_px)
        top, left = (int(v) for v in rng.integers(0, canvas_px - size + 1, size=2))
        colour = rng.uniform(0.5, 1.0, size=3)  # drawn either way: grey scenes keep the tinted scenes' layout
        if not tint:
            colour = np.ones(3)
        item = np.asarray(Image.fromarray(items[j]).resize((size, size), Image.BILINEAR))  # (size, size)
        fg = item > threshold
        window = (slice(top, top + size), slice(left, left + size))
        image[window][fg] = np.round(item[fg, None] * colour).astype(np.uint8)
        label[window][fg] = int(classes[j]) + 1
        placed.append({"pool_index": j, "class": int(classes[j]), "top": top, "left": left, "size": size})
    return image, label, placed


def load_pool(split: str, pool_size: int, source_dir: Path = DEFAULT_SOURCE_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The first ``pool_size`` Fashion-MNIST images and labels of the source of ``split`` (training/validation)."""
    images_path, labels_path = _source_files(Path(source_dir), _SOURCE_SPLIT[split])
    return read_idx_images(images_path, pool_size), read_idx_labels(labels_path, pool_size)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _with_tint(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """A marker's arguments; markers written before ``tint`` existed were tinted exports."""
    return params if params is None or "tint" in params else {**params, "tint": True}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _save(array: np.ndarray, path: Path, **kwargs: Any) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # keeps the extension PIL picks the format by
    Image.fromarray(array).save(tmp, **kwargs)
    os.replace(tmp, path)


def export_fmnist_scenes(out_root: Path, num_train: int, num_val: int, seed: int = 0,
                         source_dir: Path = DEFAULT_SOURCE_DIR, canvas_px: int = 64, pool_size: int = 10000,
                         threshold: int = 64, tint: bool = True) -> Path:
    """Write ``num_train`` training and ``num_val`` validation scenes to ``out_root`` in the ADE20K layout.

    ``images/{training,validation}/scene_<i:06d>.jpg`` (RGB, quality 95) and ``annotations/.../scene_<i:06d>.png``
    (class indices, see the module docstring). A marker holding the arguments is written last; an export with the
    same arguments then returns at once. An interrupted export (its progress marker names the same arguments)
    resumes, keeping the scenes already written (each file is written whole, then renamed). Call it from one
    process only (rank zero) and let the others wait.

    Args:
        out_root: the dataset root; it must be empty, absent, or an export of this function with the same arguments.
        num_train, num_val: scenes per split (>= 1).
        seed: the scenes' seed.
        source_dir: Fashion-MNIST's idx files (Debian's dataset-fashion-mnist by default).
        canvas_px: side of a scene in px (>= 28).
        pool_size: items are drawn from the first ``pool_size`` images of each source split.
        threshold: item pixels above it (0-255) are painted and labelled.
        tint: each item in a random colour (default), or grey as in Fashion-MNIST itself (``False``).

    Returns:
        ``out_root``, ready for ``ADE20KFolder(out_root, split, reduce_zero_label=False)``.

    Raises:
        ValueError: a bad argument, or ``out_root`` holds other files or an export with other arguments.
        FileNotFoundError: Fashion-MNIST is not in ``source_dir``.
    """
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1), ("canvas_px", canvas_px, 28),
                             ("pool_size", pool_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if not 0 <= threshold < 255:
        raise ValueError(f"threshold={threshold} must be in [0, 255)")
    out_root = Path(out_root)
    params = {"format": _FORMAT, "seed": seed, "num_train": num_train, "num_val": num_val, "canvas_px": canvas_px,
              "pool_size": pool_size, "threshold": threshold, "tint": bool(tint)}
    done, progress = (_with_tint(_read_json(out_root / name)) for name in (MARKER_NAME, PROGRESS_NAME))
    if done == params:
        logger.debug("Fashion-MNIST scenes already exported to %s", out_root)
        return out_root
    existing = sorted(p.name for p in out_root.iterdir()) if out_root.is_dir() else []
    if done is not None or (progress is not None and progress != params):
        raise ValueError(f"{out_root} holds a Fashion-MNIST scene export with other arguments "
                         f"({done or progress}); export {params} into another folder, or delete this one")
    if existing and progress is None:
        raise ValueError(f"{out_root} is not empty ({existing[:5]}) and is not a Fashion-MNIST scene export; "
                         "choose an empty or new folder")
    out_root.mkdir(parents=True, exist_ok=True)
    _write_json(out_root / PROGRESS_NAME, params)

    for split, count in (("training", num_train), ("validation", num_val)):
        images, classes = load_pool(split, pool_size, source_dir)
        image_dir, label_dir = out_root / "images" / split, out_root / "annotations" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for leftover in [*image_dir.glob("*.tmp.*"), *label_dir.glob("*.tmp.*")]:
            leftover.unlink()  # a file the interrupted export had not finished
        written = 0
        for i in range(count):
            image_path, label_path = image_dir / f"scene_{i:06d}.jpg", label_dir / f"scene_{i:06d}.png"
            if image_path.is_file() and label_path.is_file():
                continue  # written by the interrupted export: identical by construction
            rng = np.random.default_rng([seed, _SPLIT_KEY[split], i])
            image, label, _ = compose_scene(rng, images, classes, canvas_px, threshold=threshold, tint=tint)
            _save(label, label_path, compress_level=1)
            _save(image, image_path, quality=95)
            written += 1
        logger.info("Fashion-MNIST scenes %s: %d written, %d kept from an earlier run, in %s",
                    split, written, count - written, out_root)
    _write_json(out_root / MARKER_NAME, params)
    (out_root / PROGRESS_NAME).unlink()
    return out_root
