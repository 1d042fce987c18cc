"""Tar shards of an image dataset (WebDataset layout) with a binary offset index, read by global index.

Millions of small files are the slowest part of an epoch on a cluster file system. `shard_writer.write_shards`
(`beit-scale shard SRC OUT`) packs an ImageFolder, a labelled file list or the per-class tars of the
ImageNet-22k release into tar shards of about `shard_size_mb` each: per sample ``{key}.{ext}`` (the source
file's bytes, unchanged) and ``{key}.cls`` (the class index as text), so WebDataset readers work on them too.
``index.npy`` beside them says where each image's bytes start inside its shard, so `ShardDataset` reads a
sample with one positional read and no tar scanning, and the sampler, per-sample seeding and exact resume work
as on a folder: index ``i`` is the ``i``-th readable image of the source, in the source's order.

``manifest.json`` stays small (classes, one entry per shard and one for the index, the unreadable images): the
config check reads it for the class list, and every rank parses it in milliseconds. The per-sample index is a
numpy structured array (`INDEX_DTYPE`, one row per sample, in order), memory-mapped by every rank, so the ranks
of a node share one copy in the page cache. Names that only messages need (a sample's source path) stay in the
per-shard entries ``shard-NNNNNN.json`` the writer keeps for resuming.

This module holds the format (names, manifest, index) and the reader; `shard_writer` writes them.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from beit_scale.checkpoint.files import sha256
from beit_scale.data.folder import SkipUnreadable, decode_rgb, decode_rgb_array

log = logging.getLogger(__name__)

FORMAT = "beit_scale.shards.v2"
_FORMAT_V1 = "beit_scale.shards.v1"  # per-sample columns inside manifest.json (about 1 GB for ImageNet-22k)
# The shard plan, the tars and their per-shard entries (shard-NNNNNN.json) are as in v1, and shard-settings.json
# and the entries keep that tag: a v1 folder is upgraded by rerunning `beit-scale shard` into it, which keeps
# the verified shards and writes index.npy and a v2 manifest.
PLAN_FORMAT = _FORMAT_V1
MANIFEST = "manifest.json"
INDEX = "index.npy"
# One row per sample, in sample order (packed, little-endian): where the image's bytes lie in its shard, its key
# (the member name is the key zero-padded to the manifest's key_digits, then "." and exts[ext]) and its label.
# The shard of sample i follows from the shards' num_samples in the manifest.
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("size", "<i8"), ("key", "<i8"), ("label", "<i4"), ("ext", "u1")])
_NPY_MAGIC = b"\x93NUMPY"
SETTINGS = "shard-settings.json"  # written first: what OUT is being made from (a rerun must match it)
_LOCK = ".shard.lock"
_TMP = ".tmp"
_BLOCK = 512  # tar block
_MAKE_HINT = "make one with `beit-scale shard SRC OUT` (README: Data at scale)"
_SOURCE_HINT = ("SRC must be an ImageFolder (SRC/<class>/<image>), a folder of per-class tars (SRC/<class>.tar, "
                "as the ImageNet-22k release), or a text file with one `path<TAB>class_name` per line")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _sidecar(out: Path, index: int) -> Path:
    return out / f"shard-{index:06d}.json"


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


# ---------------------------------------------------------------- reading


def manifest_path(root_or_manifest: str | Path) -> Path:
    """``ROOT/manifest.json`` for a shards folder, the path itself for a manifest file."""
    path = Path(root_or_manifest).expanduser()
    if not path.exists():
        raise ValueError(f"shards folder {path} does not exist; {_MAKE_HINT}")
    path = path / MANIFEST if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path.parent} holds no {MANIFEST}, so it is not a finished shards folder; {_MAKE_HINT} "
                         "(rerunning it resumes an interrupted conversion)")
    return path


def read_manifest(root_or_manifest: str | Path) -> dict:
    """The manifest of a shards folder (or manifest file), with its format checked (small: no per-sample data)."""
    path = manifest_path(root_or_manifest)
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {_MAKE_HINT}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found == _FORMAT_V1:
        raise ValueError(f"{path} is a {_FORMAT_V1} manifest (the per-sample index inside the JSON, slow to open "
                         f"at scale); rerun `beit-scale shard {manifest.get('source', 'SRC')} {path.parent}` to "
                         f"upgrade it in place to {FORMAT}: it keeps the verified shards and writes {INDEX} and a new "
                         "manifest")
    if found != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest (format {found!r}); {_MAKE_HINT}")
    return manifest


def check_shards(manifest: dict, folder: Path, verify: bool = False) -> np.memmap:
    """Refuse a manifest that does not match its shards and index, and return the index memory-mapped.

    Refused: a shard missing or of another size (truncated or rewritten), an index of another size or length,
    sample counts that do not add up, and with ``verify`` a shard or index of another sha256, or an index row
    outside its shard or the classes. Without ``verify`` no index row is read, so opening costs no I/O per sample.

    Raises:
        ValueError: naming the problems and the command that rewrites the shards.
    """
    try:
        problems, index = _shard_problems(manifest, folder, verify)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder / MANIFEST} is malformed ({type(err).__name__}: {err}); {_MAKE_HINT}") from None
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"the shards in {folder} do not match {MANIFEST}: {'; '.join(problems[:5])}{more}. Rerun "
                         f"`beit-scale shard {manifest.get('source', 'SRC')} {folder}` to rewrite the damaged shards")
    if not len(index):
        raise ValueError(f"{folder / MANIFEST} lists no images")
    return index


def _shard_problems(manifest: dict, folder: Path, verify: bool) -> tuple[list[str], np.memmap | None]:
    problems = []
    shards = manifest["shards"]
    total = sum(int(s["num_samples"]) for s in shards)
    for shard in shards:
        path = folder / shard["name"]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != shard["size"]:
            problems.append(f"{path} is {path.stat().st_size} bytes, the manifest says {shard['size']} "
                            f"({'truncated' if path.stat().st_size < shard['size'] else 'rewritten'})")
        elif verify and sha256(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (altered)")
    if total != manifest["num_samples"]:
        problems.append(f"the shards hold {total} samples, the manifest's num_samples says {manifest['num_samples']}")
    index, index_problems = _open_index(manifest, folder)
    problems += index_problems
    if index is not None and verify and not problems:
        problems += _index_content_problems(manifest, folder, index)
    return problems, index


def _open_index(manifest: dict, folder: Path) -> tuple[np.memmap | None, list[str]]:
    """The index memory-mapped, after checking its byte size, dtype and length against the manifest."""
    entry = manifest["index"]
    path = folder / entry["name"]
    if not path.is_file():
        return None, [f"{path} is missing"]
    size = path.stat().st_size
    if size != entry["size"]:
        return None, [f"{path} is {size} bytes, the manifest says {entry['size']} "
                      f"({'truncated' if size < entry['size'] else 'rewritten'})"]
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        return None, [f"{path} does not start with the .npy header (overwritten)"]
    try:
        index = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        return None, [f"{path} is not a readable index ({type(err).__name__}: {err})"]
    if index.dtype != INDEX_DTYPE or index.ndim != 1:
        return None, [f"{path} holds {index.dtype} {index.shape}, not one {INDEX_DTYPE} row per sample"]
    if not len(index) == entry["num_samples"] == manifest["num_samples"]:
        return None, [f"{path} holds {len(index)} samples, the manifest says {entry['num_samples']} (index) and "
                      f"{manifest['num_samples']} (num_samples)"]
    return index, []


def _index_content_problems(manifest: dict, folder: Path, index: np.memmap) -> list[str]:
    """``verify``: the index's sha256, and every row inside its shard, the classes and the extensions."""
    path = folder / manifest["index"]["name"]
    if sha256(path) != manifest["index"]["sha256"]:
        return [f"{path}: sha256 differs from the manifest (altered)"]
    shard_sizes = np.repeat([s["size"] for s in manifest["shards"]], [s["num_samples"] for s in manifest["shards"]])
    outside = ((index["offset"] < 0) | (index["size"] < 0) | (index["offset"] + index["size"] > shard_sizes)
               | (index["label"] < 0) | (index["label"] >= len(manifest["classes"]))
               | (index["ext"] >= len(manifest["index"]["exts"])))
    if outside.any():
        return [f"{path}: {int(outside.sum())} rows lie outside their shard, the classes or the extensions, the "
                f"first at sample {int(np.argmax(outside))}"]
    return []


class ShardDataset(SkipUnreadable, Dataset):
    """Random access by global index into tar shards made by `write_shards`, as `SafeImageFolder` reads a folder.

    Samples are ``(RGB image, class index)``; ``classes``, ``class_to_idx``, ``targets`` and ``samples`` mean what
    they mean on `SafeImageFolder`, with index ``i`` the ``i``-th readable image of the source folder. A sample
    is one positional read at the offset ``index.npy`` records (memory-mapped: opening reads no per-sample data,
    and the ranks of a node share the pages; shard files opened lazily in each process, at most
    `max_open_files` at once; safe after fork). An undecodable member is replaced by the next readable index,
    warned once and recorded in ``bad_paths`` (`SkipUnreadable`), exactly as in `SafeImageFolder`.

    Args:
        root_or_manifest: The OUT folder of `beit-scale shard`, or its ``manifest.json``.
        transform: Optional transform applied to the PIL image (the array with ``arrays``).
        target_transform: Optional transform applied to the class index.
        max_consecutive_failures: How many consecutive unreadable samples are tolerated before giving up.
        verify: Also compare every shard's and the index's sha256 with the manifest (reads every byte once).
        max_open_files: Shard files each process keeps open.
        arrays: Decode to (H, W, 3) uint8 arrays (`decode_rgb_array`: faster for JPEGs) instead of PIL images.

    Raises:
        ValueError: No manifest, or it does not match its shards or index (`check_shards`).
    """

    def __init__(self, root_or_manifest: str | Path, transform: Callable[[Any], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None, max_consecutive_failures: int = 32,
                 verify: bool = False, max_open_files: int = 64, arrays: bool = False) -> None:
        self._init_skipping(max_consecutive_failures)
        self._decode = decode_rgb_array if arrays else decode_rgb
        path = manifest_path(root_or_manifest)
        manifest = read_manifest(path)
        self._index = check_shards(manifest, path.parent, verify)  # (num_samples,) INDEX_DTYPE, memory-mapped
        self.root = str(path.parent)
        self.transform, self.target_transform = transform, target_transform
        self.classes: list[str] = list(manifest["classes"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        shards = manifest["shards"]
        self.shard_paths = [str(path.parent / s["name"]) for s in shards]
        self._index_path = str(path.parent / manifest["index"]["name"])
        self._ends = np.cumsum([s["num_samples"] for s in shards])  # sample i lies in the first shard ending past i
        self._exts: list[str] = list(manifest["index"]["exts"])
        self._key_digits = int(manifest["index"]["key_digits"])
        self.max_open_files = max_open_files
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def targets(self) -> list[int]:
        """The class index of every sample (a new list at each access)."""
        return self._index["label"].tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(shard member, class index)`` of every sample, as ImageFolder's ``(path, class index)`` (built at
        each access; the training path never uses it)."""
        return [(self._sample_name(i), t) for i, t in enumerate(self.targets)]

    def _shard_of(self, index: int) -> int:
        return int(np.searchsorted(self._ends, index, side="right"))

    def _sample_name(self, index: int) -> str:
        row = self._index[index]
        return (f"{self.shard_paths[self._shard_of(index)]}/{int(row['key']):0{self._key_digits}d}."
                f"{self._exts[row['ext']]}")

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours to use
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            fd = os.open(self.shard_paths[shard], os.O_RDONLY)
            self._files[shard] = fd
            while len(self._files) > self.max_open_files:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(shard)
        return fd

    def _read_sample(self, index: int) -> tuple[Image.Image | np.ndarray, int]:
        row = self._index[index]
        size = int(row["size"])
        data = os.pread(self._fd(self._shard_of(index)), size, int(row["offset"]))
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes: the shard was truncated after it was checked")
        return self._decode(data), int(row["label"])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # descriptors do not travel to spawned workers
        state["_index"] = None  # pickling a memmap copies its data: the worker maps the file again
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index = np.load(self._index_path, mmap_mode="r", allow_pickle=False)

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._files.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, num_images={len(self)}, num_classes={len(self.classes)})"


def iter_members(shard: str | Path) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` of a shard in tar order, read the slow way (tests and inspection)."""
    with tarfile.open(shard, "r:") as tar:
        for m in tar:
            yield m.name, tar.extractfile(m).read()
