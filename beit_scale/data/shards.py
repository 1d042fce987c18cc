"""Tar shards of an image dataset (WebDataset layout) with an offset index, read by global index.

Millions of small files are the slowest part of an epoch on a cluster file system. `write_shards`
(`beit-scale shard SRC OUT`) packs an ImageFolder, a labelled file list or the per-class tars of the
ImageNet-22k release into tar shards of about `shard_size_mb` each: per sample ``{key}.{ext}`` (the source
file's bytes, unchanged) and ``{key}.cls`` (the class index as text), so WebDataset readers work on them too.
``manifest.json`` beside them says where each image's bytes start inside its shard, so `ShardDataset` reads a
sample with one positional read and no tar scanning, and the sampler, per-sample seeding and exact resume work
as on a folder: index ``i`` is the ``i``-th readable image of the source, in the source's order.

Conversion is restartable: each shard is written under a temporary name and renamed when complete, then its
index entry (``shard-NNNNNN.json``) likewise; a rerun keeps the shards whose index entry and size/sha256 check
out and writes the rest. Which samples go to which shard depends only on the source listing and the shard
size (never on the number of workers), so the final manifest is the same however often the run was cut.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import tarfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from beit_scale.checkpoint.files import atomic_write_text, sha256
from beit_scale.data.folder import _DECODE_ERRORS, SafeImageFolder, SkipUnreadable, decode_rgb

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


# ---------------------------------------------------------------- the source listing


class _Item(NamedTuple):
    """One source image: ``source`` names it (relative to SRC), its bytes are ``size`` bytes of ``path`` from
    ``offset`` (a member of a class tar), or the whole of ``path`` when ``offset`` is -1."""

    source: str
    label: int
    size: int
    path: str
    offset: int = -1


def _ext(name: str) -> str:
    ext = Path(name).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _list_folder(root: Path) -> tuple[list[str], list[_Item]]:
    classes, class_to_idx = find_classes(str(root))
    samples = SafeImageFolder.make_dataset(str(root), class_to_idx, IMG_EXTENSIONS)  # SafeImageFolder's order
    items = []
    for path, label in samples:
        try:
            size = os.stat(path).st_size
        except OSError:  # a broken link: listed, then reported as unreadable by the writer
            size = 0
        items.append(_Item(os.path.relpath(path, root), label, size, path))
    return classes, items


def _list_file(path: Path) -> tuple[list[str], list[_Item]]:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"SRC {path} is a file but not a text list of images; {_SOURCE_HINT}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        image, sep, name = line.rstrip("\n").partition("\t")
        if not sep or not image or not name.strip():
            raise ValueError(f"{path}:{number}: {line!r} must be `path<TAB>class_name` (a tab between them)")
        rows.append((image, name.strip()))
    if not rows:
        raise ValueError(f"{path} lists no images; {_SOURCE_HINT}")
    classes = sorted({name for _, name in rows})
    class_to_idx = {name: i for i, name in enumerate(classes)}
    items = []
    for image, name in rows:  # the list's own order
        full = image if os.path.isabs(image) else str(path.parent / image)
        try:
            size = os.stat(full).st_size
        except OSError:
            size = 0
        items.append(_Item(image, class_to_idx[name], size, full))
    return classes, items


def _tar_members(job: tuple[str, int]) -> list[_Item]:
    """The images of one class tar, sorted by member name (runs in the pool)."""
    path, label = job
    items = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile() and has_file_allowed_extension(m.name, IMG_EXTENSIONS):
                    items.append(_Item(f"{Path(path).name}/{m.name}", label, m.size, path, m.offset_data))
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path} is not a readable tar ({type(err).__name__}: {err}); re-download it or move it "
                         "out of SRC") from None
    return sorted(items)


def _list_tars(tars: list[Path], pool) -> tuple[list[str], list[_Item]]:
    classes = [p.stem for p in tars]
    items: list[_Item] = []
    for done, members in enumerate(_map(pool, _tar_members, [(str(p), i) for i, p in enumerate(tars)]), 1):
        items += members
        if done % 1000 == 0:
            log.info("listed %d/%d class tars (%d images)", done, len(tars), len(items))
    return classes, items


def _list_source(src: Path, pool) -> tuple[str, list[str], list[_Item]]:
    """``(kind, class names, items)`` of SRC, in a fixed order."""
    if src.is_file():
        return ("list", *_list_file(src))
    if not src.is_dir():
        raise ValueError(f"SRC {src} does not exist; {_SOURCE_HINT}")
    entries = sorted(src.iterdir())
    folders = [p for p in entries if p.is_dir()]
    tars = [p for p in entries if p.suffix == ".tar" and p.is_file()]
    if folders and tars:
        raise ValueError(f"SRC {src} holds both class folders ({folders[0].name}, ...) and tars ({tars[0].name}, "
                         "...); keep one layout in SRC: " + _SOURCE_HINT)
    if tars:
        return ("tars", *_list_tars(tars, pool))
    if not folders:
        raise ValueError(f"SRC {src} holds neither class folders nor class tars; {_SOURCE_HINT}")
    return ("folder", *_list_folder(src))


def _listing_sha256(kind: str, classes: list[str], items: list[_Item]) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, kind, classes]).encode())
    for item in items:
        h.update(json.dumps([item.source, item.label, item.size]).encode())
    return h.hexdigest()


def _plan(items: list[_Item], shard_bytes: float) -> list[range]:
    """Consecutive runs of items whose tar bytes stay within ``shard_bytes`` (each shard holds at least one).

    Depends on the listing and the size only, so any number of workers writes the same shards."""
    shards, start, used = [], 0, 0
    for i, item in enumerate(items):
        cost = 3 * _BLOCK + _padded(item.size)  # image header + data, .cls header + data
        if i > start and used + cost > shard_bytes:
            shards.append(range(start, i))
            start, used = i, 0
        used += cost
    shards.append(range(start, len(items)))
    return shards


def _shard_fingerprint(keys: list[str], items: list[_Item]) -> str:
    return hashlib.sha256(json.dumps([FORMAT, keys, [list(it[:3]) for it in items]]).encode()).hexdigest()


# ---------------------------------------------------------------- writing one shard (runs in the pool)


class _HashingFile:
    """A write-only file that hashes what goes through it (tarfile writes sequentially)."""

    def __init__(self, f):
        self.f, self.h, self.pos = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.h.update(data)
        self.pos += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.pos


def _read_bytes(item: _Item) -> bytes:
    with open(item.path, "rb") as f:
        if item.offset < 0:
            return f.read()
        f.seek(item.offset)
        data = f.read(item.size)
    if len(data) != item.size:
        raise OSError(f"{item.path} ends inside member {item.source}")
    return data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a member with fixed metadata (same bytes on every run); returns where its data starts."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - _padded(len(data))


class _ShardJob(NamedTuple):
    out: str
    index: int
    keys: list[str]
    items: list[_Item]
    fingerprint: str


def _write_shard(job: _ShardJob) -> tuple[int, dict]:
    """Write one shard under a temporary name, rename it, then write its index entry the same way."""
    out, name = Path(job.out), shard_name(job.index)
    cols: dict[str, list] = {"key": [], "ext": [], "label": [], "offset": [], "size": [], "source": []}
    corrupt = []
    tmp = out / (name + _TMP)
    with open(tmp, "wb") as f:
        hashing = _HashingFile(f)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, item in zip(job.keys, job.items):
                try:
                    data = _read_bytes(item)
                    decode_rgb(data)  # what SafeImageFolder would do with it
                except _DECODE_ERRORS as err:
                    corrupt.append({"source": item.source, "reason": f"{type(err).__name__}: {err}"})
                    continue
                ext = _ext(item.source)
                offset = _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.cls", str(item.label).encode())
                for col, value in zip(cols, (key, ext, item.label, offset, len(data), item.source)):
                    cols[col].append(value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    entry = {"name": name, "num_samples": len(cols["key"]), "size": hashing.pos, "sha256": hashing.h.hexdigest(),
             "samples": cols}
    sidecar = {"format": FORMAT, "plan": job.fingerprint, "shard": entry, "corrupt": corrupt}
    atomic_write_text(_sidecar(out, job.index), json.dumps(sidecar, separators=(",", ":")))
    return job.index, sidecar


def _kept(job: _ShardJob) -> tuple[dict | None, str]:
    """The index entry of a shard an earlier run completed, if its plan, size and sha256 still match; else
    None and why (empty when there was nothing to keep)."""
    path = _sidecar(Path(job.out), job.index)
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, ""  # never completed (the index entry is written last)
    shard = Path(job.out) / shard_name(job.index)
    entry = sidecar.get("shard", {}) if isinstance(sidecar, dict) else {}
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT or sidecar.get("plan") != job.fingerprint:
        return None, f"{path.name} was written for other samples"
    if not shard.is_file() or shard.stat().st_size != entry.get("size") or sha256(shard) != entry.get("sha256"):
        return None, f"{shard} does not match its index entry {path.name} (size or sha256)"
    return sidecar, ""


# ---------------------------------------------------------------- the conversion


def _map(pool, fn: Callable, jobs: list, ordered: bool = True) -> Iterable:
    if pool is None:
        return map(fn, jobs)
    return pool.imap(fn, jobs) if ordered else pool.imap_unordered(fn, jobs)


def _pool(workers: int):
    if workers == 1:
        return None
    # fork: the workers need no import of their own (spawn would re-import torch in each)
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    return ctx.Pool(workers)


def _lock(out: Path):
    handle = open(out / _LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"another `beit-scale shard` is writing to {out}; wait for it, or give this one another "
                         "OUT") from None
    except OSError as err:  # a file system without flock (some NFS/Lustre mounts)
        log.warning("cannot lock %s (%s); do not run two conversions into it at once", out, err)
    return handle


def _ours(name: str) -> bool:
    return (name in (MANIFEST, SETTINGS, _LOCK) or name.endswith(_TMP)
            or (name.startswith("shard-") and name.endswith((".tar", ".json"))))


def _claim(out: Path, settings: dict, record: bool = True) -> None:
    """Accept OUT if it is empty or an earlier run of the same conversion; record the settings (``record``)."""
    path = out / SETTINGS
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if before != settings:
            before = before if isinstance(before, dict) else {}
            diff = [f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in settings.items() if before.get(k) != v]
            raise ValueError(f"OUT {out} holds shards made from other settings or another SRC ({'; '.join(diff)}); "
                             "resuming would mix them. Give this conversion another OUT, or delete "
                             f"{out} to start over")
        return
    others = sorted(p.name for p in out.iterdir() if not _ours(p.name))
    if others or (out / MANIFEST).exists():
        raise ValueError(f"OUT {out} is not empty ({', '.join((others or [MANIFEST])[:3])}, ...) and was not started "
                         "by `beit-scale shard`; give it an empty or new folder")
    if record:
        atomic_write_text(path, json.dumps(settings, indent=1))


def write_shards(src: str | Path, out: str | Path, shard_size_mb: float = 1000.0, workers: int | None = None) -> dict:
    """Convert SRC into tar shards plus ``manifest.json`` in OUT; resume an interrupted run into the same OUT.

    Args:
        src: An ImageFolder (``SRC/<class>/<image>``, listed as `SafeImageFolder` lists it), a folder of per-class
            tars (``SRC/<class>.tar``, the ImageNet-22k winter release; classes and members sorted by name), or a
            text file with one ``path<TAB>class_name`` per line (relative paths from the file's folder; classes
            sorted by name, images in the file's order).
        out: Folder for the shards, created if needed; empty, or holding an interrupted run of this conversion.
        shard_size_mb: Target shard size in MB (10^6 bytes); a shard holds at least one image.
        workers: Processes (default: the CPUs this process may use). The output does not depend on it.

    Returns:
        The manifest (also written to ``OUT/manifest.json``).

    Raises:
        ValueError: SRC has none of the layouts, OUT is not empty or was made from other settings, a class tar
            is unreadable, or no image of SRC is readable.
    """
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not shard_size_mb > 0 or math.isinf(shard_size_mb):
        raise ValueError(f"--shard-size={shard_size_mb} must be a positive number of MB, e.g. 1000")
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers={workers} must be >= 1")
    if out == src or src in out.parents:
        raise ValueError(f"OUT {out} is inside SRC {src}: the shards would become part of the source; pick an OUT "
                         "outside SRC")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; give a folder")
    started = time.monotonic()
    pool = _pool(workers)
    try:
        kind, classes, items = _list_source(src, pool)
        if not items:
            raise ValueError(f"SRC {src} holds no images with extensions {', '.join(IMG_EXTENSIONS)}; {_SOURCE_HINT}")
        plan = _plan(items, shard_size_mb * 1e6)
        settings = {"format": FORMAT, "source": str(src), "source_kind": kind, "shard_size_mb": shard_size_mb,
                    "num_listed": len(items), "listing_sha256": _listing_sha256(kind, classes, items)}
        log.info("%s (%s): %d images of %d classes -> %d shards of about %g MB in %s, %d workers", src, kind,
                 len(items), len(classes), len(plan), shard_size_mb, out, workers)
        if out.is_dir():
            _claim(out, settings, record=False)  # refused before anything is written there
        out.mkdir(parents=True, exist_ok=True)
        with _lock(out):
            _claim(out, settings)
            for leftover in out.glob(f"*{_TMP}"):  # an interrupted write: never part of the result
                leftover.unlink()
            digits = max(9, len(str(len(items) - 1)))
            jobs = []
            for i, r in enumerate(plan):
                keys, members = [f"{k:0{digits}d}" for k in r], items[r.start:r.stop]
                jobs.append(_ShardJob(str(out), i, keys, members, _shard_fingerprint(keys, members)))
            sidecars: dict[int, dict] = {}
            for job, (kept, why) in zip(jobs, _map(pool, _kept, jobs)):
                if kept is not None:
                    sidecars[job.index] = kept
                elif why:
                    log.warning("%s: writing it again", why)
            if sidecars:
                log.info("resuming: %d of %d shards are complete and verified (size, sha256)", len(sidecars), len(plan))
            todo = [job for job in jobs if job.index not in sidecars]
            _write_all(todo, pool, sidecars, len(plan), started)
            manifest = _manifest(settings, classes, [sidecars[i] for i in range(len(plan))])
            if not manifest["num_samples"]:
                raise ValueError(f"none of the {len(items)} images of SRC {src} is readable, e.g. "
                                 f"{manifest['corrupt'][0]['source']}: {manifest['corrupt'][0]['reason']}")
            atomic_write_text(out / MANIFEST, json.dumps(manifest, separators=(",", ":")))
    finally:
        if pool is not None:
            pool.terminate()
    log.info("wrote %s: %d images in %d shards, %d unreadable images left out (listed in the manifest), %.0f s",
             out / MANIFEST, manifest["num_samples"], len(plan), len(manifest["corrupt"]), time.monotonic() - started)
    return manifest


def _write_all(todo: list[_ShardJob], pool, sidecars: dict[int, dict], total: int, started: float) -> None:
    images = sum(len(job.keys) for job in todo)
    done_images = 0
    for index, sidecar in _map(pool, _write_shard, todo, ordered=False):
        sidecars[index] = sidecar
        done_images += len(sidecar["shard"]["samples"]["key"]) + len(sidecar["corrupt"])
        for bad in sidecar["corrupt"]:
            log.warning("left out unreadable image %s (%s)", bad["source"], bad["reason"])
        rate = done_images / max(time.monotonic() - started, 1e-9)
        log.info("shard %d/%d written (%s, %d images); %d/%d images to write done, %.0f images/s", len(sidecars), total,
                 sidecar["shard"]["name"], sidecar["shard"]["num_samples"], done_images, images, rate)


def _manifest(settings: dict, classes: list[str], sidecars: list[dict]) -> dict:
    shards = [s["shard"] for s in sidecars]
    return {"format": FORMAT, "source": settings["source"], "source_kind": settings["source_kind"],
            "shard_size_mb": settings["shard_size_mb"], "listing_sha256": settings["listing_sha256"],
            "classes": classes, "num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
            "corrupt": [bad for s in sidecars for bad in s["corrupt"]]}


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
