"""One run, one folder: take its lock, move an earlier run aside on request, refuse a resume that changes the run."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.lock import lock_run_folder
from beit_scale.config import Config, changed_fields

log = logging.getLogger(__name__)


_CLAIMED: set[Path] = set()


def claim_run_folder(cfg: Config, info) -> RunLayout:
    """Make the run folder and hold it for this run: rank 0 takes its lock (every rank learns the verdict), then
    with ``checkpoint.start_over`` an earlier run's outputs move to ``before-<time>/``. Once per process."""
    layout = RunLayout(Path(cfg.run.output_dir)).make()
    if layout.root.resolve() in _CLAIMED:
        return layout
    refusal = [lock_run_folder(layout) if info.rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise ValueError(refusal[0])
    if cfg.checkpoint.start_over and layout.previous_outputs():
        if info.rank == 0:
            log.warning("checkpoint.start_over: moved the earlier run's outputs to %s",
                        layout.retire(time.strftime("%Y%m%d-%H%M%S")))
        if dist.is_initialized():
            dist.barrier()  # no rank writes here before the folder is empty
    _CLAIMED.add(layout.root.resolve())
    return layout


def refuse_config_change(cfg: Config, saved: dict, where: Path, warn: bool = True) -> None:
    """A resume must not silently change the run: fields outside SAFE_ON_RESUME and checkpoint.allow_changes
    that differ from the checkpoint's config are refused, naming each with both values."""
    changed = changed_fields(saved, cfg)
    refused = [c for c in changed if c[0] not in cfg.checkpoint.allow_changes]
    if refused:
        names = ",".join(name for name, _, _ in refused)
        raise ValueError(
            f"{where} was saved with another config: "
            + "; ".join(f"{name} {old!r} -> {new!r}" for name, old, new in refused)
            + ". Resuming would change the run silently (a schedule that jumps, other data or targets). Put the "
            f"values back, or allow the change with --allow-config-change {names} (checkpoint.allow_changes), or "
            "start a new run: another run.output_dir, or checkpoint.resume=false checkpoint.start_over=true")
    for name, old, new in changed if warn else ():
        log.warning("resuming with %s changed from %r to %r (checkpoint.allow_changes)", name, old, new)
