"""Tar shards of an image dataset (WebDataset layout) with an offset index, read by global index.

Millions of small files are the slowest part of an epoch on a cluster file system. `shard_writer.write_shards`
(`beit-scale shard SRC OUT`) packs an ImageFolder, a labelled file list or the per-class tars of the
ImageNet-22k release into tar shards of about `shard_size_mb` each: per sample ``{key}.{ext}`` (the source
file's bytes, unchanged) and ``{key}.cls`` (the class index as text), so WebDataset readers work on them too.
``manifest.json`` beside them says where each image's bytes start inside its shard, so `ShardDataset` reads a
sample with one positional read and no tar scanning, and the sampler, per-sample seeding and exact resume work
as on a folder: index ``i`` is the ``i``-th readable image of the source, in the source's order.


This module holds the format (names, manifest) and the reader; `shard_writer` writes them.
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
from beit_scale.data.folder import SkipUnreadable, decode_rgb

log = logging.getLogger(__name__)

FORMAT = "beit_scale.shards.v1"
MANIFEST = "manifest.json"
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
    """The manifest of a shards folder (or manifest file), with its format checked."""
    path = manifest_path(root_or_manifest)
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {_MAKE_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} is not a {FORMAT} manifest (format {found!r}); {_MAKE_HINT}")
    return manifest


def check_shards(manifest: dict, folder: Path, verify: bool = False) -> None:
    """Refuse a manifest that does not match its shards: a shard missing, of another size (truncated or
    rewritten), an index that does not add up, or (``verify``) another sha256. Raises ValueError naming them."""
    try:
        problems, total = _shard_problems(manifest, folder, verify)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder / MANIFEST} is malformed ({type(err).__name__}: {err}); {_MAKE_HINT}") from None
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"the shards in {folder} do not match {MANIFEST}: {'; '.join(problems[:5])}{more}. Rerun "
                         f"`beit-scale shard {manifest.get('source', 'SRC')} {folder}` to rewrite the damaged shards")
    if not total:
        raise ValueError(f"{folder / MANIFEST} lists no images")


def _shard_problems(manifest: dict, folder: Path, verify: bool) -> tuple[list[str], int]:
    problems = []
    num_classes = len(manifest["classes"])
    total = 0
    for shard in manifest["shards"]:
        path, cols = folder / shard["name"], shard["samples"]
        n = shard["num_samples"]
        total += n
        if any(len(cols[c]) != n for c in ("key", "ext", "label", "offset", "size")):
            problems.append(f"{shard['name']}: the index lists another number of samples than num_samples={n}")
        elif n and (max(o + s for o, s in zip(cols["offset"], cols["size"])) > shard["size"]
                    or not 0 <= min(cols["label"]) <= max(cols["label"]) < num_classes):
            problems.append(f"{shard['name']}: an offset or label of the index lies outside the shard or classes")
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != shard["size"]:
            problems.append(f"{path} is {path.stat().st_size} bytes, the manifest says {shard['size']} "
                            f"({'truncated' if path.stat().st_size < shard['size'] else 'rewritten'})")
        elif verify and sha256(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (altered)")
    if total != manifest["num_samples"]:
        problems.append(f"the shards hold {total} samples, the manifest's num_samples says {manifest['num_samples']}")
    return problems, total


class ShardDataset(SkipUnreadable, Dataset):
    """Random access by global index into tar shards made by `write_shards`, as `SafeImageFolder` reads a folder.

    Samples are ``(RGB image, class index)``; ``classes``, ``class_to_idx``, ``targets`` and ``samples`` mean what
    they mean on `SafeImageFolder`, with index ``i`` the ``i``-th readable image of the source folder. A sample
    is one positional read at the offset the manifest records (files opened lazily in each process, at most
    `max_open_files` at once; safe after fork). An undecodable member is replaced by the next readable index,
    warned once and recorded in ``bad_paths`` (`SkipUnreadable`), exactly as in `SafeImageFolder`.

    Args:
        root_or_manifest: The OUT folder of `beit-scale shard`, or its ``manifest.json``.
        transform: Optional transform applied to the PIL image.
        target_transform: Optional transform applied to the class index.
        max_consecutive_failures: How many consecutive unreadable samples are tolerated before giving up.
        verify: Also compare every shard's sha256 with the manifest (reads every byte once).
        max_open_files: Shard files each process keeps open.

    Raises:
        ValueError: No manifest, or it does not match its shards (`check_shards`).
    """

    def __init__(self, root_or_manifest: str | Path, transform: Callable[[Any], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None, max_consecutive_failures: int = 32,
                 verify: bool = False, max_open_files: int = 64) -> None:
        self._init_skipping(max_consecutive_failures)
        path = manifest_path(root_or_manifest)
        manifest = read_manifest(path)
        check_shards(manifest, path.parent, verify)
        self.root = str(path.parent)
        self.transform, self.target_transform = transform, target_transform
        self.classes: list[str] = list(manifest["classes"])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        shards = manifest["shards"]
        self.shard_paths = [str(path.parent / s["name"]) for s in shards]
        exts = sorted({e for s in shards for e in s["samples"]["ext"]})
        code = {e: i for i, e in enumerate(exts)}
        # Flat arrays, not Python objects: forked loader workers share them without copying (no refcounts).
        self._exts = exts
        self._shard = np.concatenate([np.full(s["num_samples"], i, np.int32) for i, s in enumerate(shards)])
        self._offset = np.concatenate([np.asarray(s["samples"]["offset"], np.int64) for s in shards])
        self._size = np.concatenate([np.asarray(s["samples"]["size"], np.int64) for s in shards])
        self._label = np.concatenate([np.asarray(s["samples"]["label"], np.int64) for s in shards])
        self._key = np.concatenate([np.asarray(s["samples"]["key"], np.bytes_) for s in shards])
        self._ext = np.concatenate([np.asarray([code[e] for e in s["samples"]["ext"]], np.uint8) for s in shards])
        self.max_open_files = max_open_files
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._label)

    @property
    def targets(self) -> list[int]:
        """The class index of every sample (a new list at each access)."""
        return self._label.tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(shard member, class index)`` of every sample, as ImageFolder's ``(path, class index)``."""
        return [(self._sample_name(i), int(t)) for i, t in enumerate(self._label)]

    def _sample_name(self, index: int) -> str:
        return f"{self.shard_paths[self._shard[index]]}/{self._key[index].decode()}.{self._exts[self._ext[index]]}"

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

    def _read_sample(self, index: int) -> tuple[Image.Image, int]:
        size = int(self._size[index])
        data = os.pread(self._fd(int(self._shard[index])), size, int(self._offset[index]))
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes: the shard was truncated after it was checked")
        return decode_rgb(data), int(self._label[index])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # descriptors do not travel to spawned workers
        return state

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
