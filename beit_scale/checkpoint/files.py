"""Where the files of one checkpoint live, its manifest, and how a checkpoint is judged complete."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
TAG_PREFIX = "step_"


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step:09d}"


def step_of(tag: str) -> int:
    return int(tag[len(TAG_PREFIX):])


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
    """Compare this rank's share (``index % world == rank``) of the manifest's entries with the files."""
    rank, world = share
    problems = []
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
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def committed_tags(root: Path) -> list[str]:
    """Tags with a manifest, newest first (a manifest is written only after every rank's files are complete)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(tags, key=step_of, reverse=True)
