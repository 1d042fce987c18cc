"""Where the files of one checkpoint live, its manifest, and how a checkpoint is judged complete."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from beit_scale.checkpoint.layout import RunLayout

MANIFEST = "manifest.json"
TAG_PREFIX = "step_"


_TAG = re.compile(r"step_(\d{9})")
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed copies these beside the step folders


class ManifestError(ValueError):
    """A manifest exists but cannot be read (bad bytes, bad JSON, missing fields): the checkpoint is damaged."""


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step:09d}"


def is_tag(name: str) -> bool:
    """True for the names :func:`tag_of` writes, and nothing else (``step_000000004.bak``, ``step_old``)."""
    return _TAG.fullmatch(name) is not None


def step_of(tag: str) -> int:
    match = _TAG.fullmatch(tag)
    if match is None:
        raise ValueError(f"{tag!r} is not a checkpoint folder name (step_ and nine digits)")
    return int(match.group(1))


def strangers(layout: RunLayout) -> list[str]:
    """Names in a run's checkpoints folder that no beit_scale run wrote (a user's backup copy, say): never read."""
    root = layout.checkpoints
    if not root.is_dir():
        return []
    ours = {layout.latest.name, layout.latest.name + ".tmp", layout.universal.name, *DEEPSPEED_SCRIPTS}
    return sorted(p.name for p in root.iterdir() if not (is_tag(p.name) and p.is_dir()) and p.name not in ours)


def rank_state_file(ckpt: Path, rank: int) -> Path:
    """Per-rank state (counters, data position, RNG): DeepSpeed keeps only rank 0's client state at ZeRO 1/2."""
    return ckpt / f"beit_rank{rank:05d}.pt"


def meta_file(ckpt: Path) -> Path:
    """Resolved config, world size, precision and package versions of the run that saved ``ckpt``."""
    return ckpt / "beit_meta.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def payload_files(ckpt: Path) -> list[Path]:
    """Every file of a checkpoint but its manifest, sorted."""
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def check_files(ckpt: Path, entries: dict[str, dict], share: tuple[int, int] = (0, 1)) -> list[Problem]:
    """Compare this rank's share (``index % world == rank``) of the manifest's entries with the files; rank 0
    also names every file the manifest does not list (DeepSpeed would load a planted shard without asking)."""
    rank, world = share
    problems = []
    if rank == 0:
        problems += [Problem(str(p), "not listed in the manifest (planted or left by another run)")
                     for p in payload_files(ckpt) if str(p.relative_to(ckpt)) not in entries]
    for i, (rel, entry) in enumerate(sorted(entries.items())):
        if i % world != rank:
            continue
        path = ckpt / rel
        if not path.is_file():
            problems.append(Problem(str(path), "missing"))
        elif path.stat().st_size != entry["size"]:
            problems.append(Problem(str(path), f"size {path.stat().st_size} != {entry['size']} in the manifest (truncated?)"))
        elif sha256(path) != entry["sha256"]:
            problems.append(Problem(str(path), "checksum differs from the manifest (altered)"))
    return problems


def read_manifest(ckpt: Path) -> dict | None:
    """The manifest of ``ckpt``; None when there is none (the save did not finish).

    Raises:
        ManifestError: It exists but cannot be read or lacks what a manifest holds, naming the file.
    """
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is unreadable ({type(err).__name__}: {str(err)[:120]})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = (isinstance(files, dict) and isinstance(manifest.get("world_size"), int) and manifest["world_size"] >= 1
          and all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                  for e in files.values()))
    if not ok:
        raise ManifestError(f"{path} lacks what a manifest holds (world_size, and files with size and sha256)")
    return manifest


def committed_tags(root: Path) -> list[str]:
    """Tags with a manifest, newest first (a manifest is written only after every rank's files are complete)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if is_tag(p.name) and p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(tags, key=step_of, reverse=True)


def newest_saved_config(layout: RunLayout) -> tuple[Path, dict] | None:
    """(step folder, resolved config) of the newest committed checkpoint whose meta file reads; None if none."""
    for tag in committed_tags(layout.checkpoints):
        try:
            config = json.loads(meta_file(layout.checkpoints / tag).read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(config, dict):
            return layout.checkpoints / tag, config
    return None
