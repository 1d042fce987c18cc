"""`beit-scale shard SRC OUT`: an image dataset to tar shards with an offset index (read by `shards.ShardDataset`).

Conversion is restartable: each shard is written under a temporary name and renamed when complete, then its
index entry (``shard-NNNNNN.json``, with every sample's key, offset, size, label and source path) likewise; a
rerun keeps the shards whose index entry and size/sha256 check out and writes the rest. At the end the entries
become the binary ``index.npy``, then ``manifest.json`` is written (each atomically, the manifest last, so a
manifest implies its index). Which samples go to which shard depends only on the source listing and the shard
size (never on the number of workers), so the index and manifest are the same however often the run was cut.
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
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from beit_scale.checkpoint.files import atomic_write_text, sha256
from beit_scale.data.folder import _DECODE_ERRORS, SafeImageFolder, decode_rgb
from beit_scale.data.shards import (_BLOCK, _LOCK, _SOURCE_HINT, _TMP, FORMAT, INDEX, INDEX_DTYPE, MANIFEST,
                                    PLAN_FORMAT, SETTINGS, _padded, _sidecar, shard_name)

log = logging.getLogger(__name__)


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
    h = hashlib.sha256(json.dumps([PLAN_FORMAT, kind, classes]).encode())
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
    return hashlib.sha256(json.dumps([PLAN_FORMAT, keys, [list(it[:3]) for it in items]]).encode()).hexdigest()


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
    sidecar = {"format": PLAN_FORMAT, "plan": job.fingerprint, "shard": entry, "corrupt": corrupt}
    atomic_write_text(_sidecar(out, job.index), json.dumps(sidecar, separators=(",", ":")))
    return job.index, _compact(sidecar)


def _compact(sidecar: dict) -> dict:
    """A shard's index entry with its per-sample columns as index rows (no source paths): what the index and the
    manifest need, about 30 bytes a sample in the parent instead of six Python objects."""
    entry = dict(sidecar["shard"])
    cols = entry.pop("samples")
    exts, codes = np.unique(np.asarray(cols["ext"], dtype=str), return_inverse=True)
    rows = np.empty(len(cols["key"]), INDEX_DTYPE)
    rows["offset"], rows["size"], rows["label"] = cols["offset"], cols["size"], cols["label"]
    rows["key"] = [int(k) for k in cols["key"]]
    rows["ext"] = codes
    return {"shard": entry, "corrupt": sidecar["corrupt"], "rows": rows, "exts": exts.tolist()}


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
    if not isinstance(sidecar, dict) or sidecar.get("format") != PLAN_FORMAT or sidecar.get("plan") != job.fingerprint:
        return None, f"{path.name} was written for other samples"
    if not shard.is_file() or shard.stat().st_size != entry.get("size") or sha256(shard) != entry.get("sha256"):
        return None, f"{shard} does not match its index entry {path.name} (size or sha256)"
    return _compact(sidecar), ""


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
    return (name in (MANIFEST, INDEX, SETTINGS, _LOCK) or name.endswith(_TMP)
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
        settings = {"format": PLAN_FORMAT, "source": str(src), "source_kind": kind, "shard_size_mb": shard_size_mb,
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
            done = [sidecars.pop(i) for i in range(len(plan))]
            corrupt = [bad for s in done for bad in s["corrupt"]]
            if len(corrupt) == len(items):
                raise ValueError(f"none of the {len(items)} images of SRC {src} is readable, e.g. "
                                 f"{corrupt[0]['source']}: {corrupt[0]['reason']}")
            index = _write_index(out, done, key_digits=digits)  # first: a manifest implies a complete index
            manifest = _manifest(settings, classes, done, index)
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
        done_images += len(sidecar["rows"]) + len(sidecar["corrupt"])
        for bad in sidecar["corrupt"]:
            log.warning("left out unreadable image %s (%s)", bad["source"], bad["reason"])
        rate = done_images / max(time.monotonic() - started, 1e-9)
        log.info("shard %d/%d written (%s, %d images); %d/%d images to write done, %.0f images/s", len(sidecars), total,
                 sidecar["shard"]["name"], sidecar["shard"]["num_samples"], done_images, images, rate)


def _write_index(out: Path, sidecars: list[dict], key_digits: int) -> dict:
    """Write ``index.npy`` (every shard's rows in order, one extension table) atomically; returns its manifest
    entry. np.save writes the same bytes for the same rows, so a resumed conversion writes the same file."""
    exts = sorted({e for s in sidecars for e in s["exts"]})
    rows = np.concatenate([s["rows"] for s in sidecars])
    start = 0
    for s in sidecars:  # shard-local extension codes -> codes into `exts`
        n = len(s["rows"])
        if n:
            rows["ext"][start:start + n] = np.searchsorted(exts, s["exts"]).astype(np.uint8)[s["rows"]["ext"]]
        start += n
    path, tmp = out / INDEX, out / (INDEX + _TMP)
    with open(tmp, "wb") as f:
        np.save(f, rows, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": INDEX, "num_samples": len(rows), "size": path.stat().st_size, "sha256": sha256(path),
            "exts": exts, "key_digits": key_digits}


def _manifest(settings: dict, classes: list[str], sidecars: list[dict], index: dict) -> dict:
    shards = [s["shard"] for s in sidecars]
    return {"format": FORMAT, "source": settings["source"], "source_kind": settings["source_kind"],
            "shard_size_mb": settings["shard_size_mb"], "listing_sha256": settings["listing_sha256"],
            "classes": classes, "num_samples": index["num_samples"], "index": index, "shards": shards,
            "corrupt": [bad for s in sidecars for bad in s["corrupt"]]}
