"""Resume on a different number of ranks through DeepSpeed's universal checkpoint.

A ZeRO checkpoint is partitioned for the world size that saved it. ``ds_to_universal`` rewrites it as one
file per parameter (weights and AdamW moments), which ``"checkpoint": {"load_universal": true}`` loads on
any world size. DeepSpeed reads that flag when it loads, so :func:`needs_universal` decides it from the
newest complete checkpoint before the engine is built.

DeepSpeed 0.19.8's universal load at ZeRO-3 gives every param group group 0's hyperparameters (weight
decay, layer-decay ``lr_scale``) and one shared AdamW ``step`` tensor that each sub-group increments;
:class:`GroupSettings` puts both right after loading.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from beit_scale.checkpoint.files import ManifestError, committed_tags, meta_file, read_manifest
from beit_scale.checkpoint.layout import RunLayout

log = logging.getLogger(__name__)


def unpartitioned(ckpt: Path) -> bool:
    """True for a ZeRO-0 fp32 checkpoint: its one model-states file holds the whole optimizer, any world loads it."""
    try:
        meta = saved_meta(ckpt)
    except (OSError, ValueError):
        return False
    return meta.get("zero_stage") == 0 and meta.get("dtype") == "float32"


def needs_universal(layout: RunLayout, world: int, resume: bool) -> bool:
    """True when this run will resume a partitioned checkpoint saved by another number of ranks."""
    manifest = None
    for tag in committed_tags(layout.checkpoints) if resume else []:  # the newest readable one: resume tries it
        try:
            manifest = read_manifest(layout.checkpoints / tag)
            break
        except ManifestError:
            continue
    if manifest is None or manifest["world_size"] == world or unpartitioned(layout.checkpoints / tag):
        return False
    saved = manifest["world_size"]
    log.warning("the newest checkpoint was saved by %d ranks and this run has %d: it will be converted to a "
                "universal checkpoint and re-partitioned", saved, world)
    return True


def saved_meta(ckpt: Path) -> dict:
    return json.loads(meta_file(ckpt).read_text())


def convert(layout: RunLayout, tag: str) -> Path:
    """Convert checkpoint ``tag`` to a universal one (rank 0 only); returns the folder DeepSpeed loads from.

    The conversion goes to a temporary folder renamed into place when done, so a killed conversion is
    redone, never half-used. Its inputs were verified against the manifest and scanned for unsafe pickles; an
    earlier conversion is never reused, as nothing vouches for files that lay in the run folder since.
    """
    out = layout.universal / tag
    tmp = layout.universal / f"{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("converting %s to a universal checkpoint in %s", layout.checkpoints / tag, out)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(layout.checkpoints / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal failed on {layout.checkpoints / tag}:\n{proc.stderr[-3000:]}")
    for old in layout.universal.iterdir():  # one conversion is enough; older ones are stale
        if old.name != f"{tag}.tmp":
            shutil.rmtree(old, ignore_errors=True)
    tmp.rename(out)
    return layout.universal


def _inner(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (or the optimizer itself at ZeRO-0)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


class GroupSettings:
    """Each param group's hyperparameters, captured before a universal load and put back after it."""

    def __init__(self, engine):
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in _inner(engine).param_groups]

    def restore(self, engine) -> None:
        inner = _inner(engine)
        if len(inner.param_groups) != len(self.groups):
            raise RuntimeError(f"the optimizer has {len(inner.param_groups)} param groups after loading, "
                               f"{len(self.groups)} before")
        changed = sum(any(g.get(k) != v for k, v in saved.items() if k != "lr")
                      for g, saved in zip(inner.param_groups, self.groups))
        for group, saved in zip(inner.param_groups, self.groups):
            group.update(saved)
        # One `step` tensor per parameter: a shared one is incremented once per sub-group and step.
        shared = 0
        seen: set[int] = set()
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                    shared += 1
                seen.add(id(step))
        if changed or shared:
            log.warning("corrected DeepSpeed's universal load: %d param groups had group 0's settings, %d AdamW "
                        "step counters were shared", changed, shared)
