"""Test hook: kill this process at a named point of training or of a checkpoint save.

``BEIT_SCALE_FAULT=<point>@<step>[:<rank>]`` kills rank ``rank`` (default 0) with SIGKILL when the run
reaches ``point`` at optimizer step ``step``. Points: ``after_step`` (a step finished, nothing saved),
``before_files`` (a save began, nothing written), ``mid_file`` (the shards are written but one is cut
in half, as a write interrupted part way), ``after_shards`` (every rank's files, no manifest),
``after_manifest`` (manifest written, pointer not replaced).

``BEIT_SCALE_FAULT=signal@<step>[:<rank>]`` sends that rank its own preemption signal after the step, as
Slurm would (the handler and the agreement are the real ones). ``hang@<step>[:<rank>]`` freezes that rank
with SIGSTOP after the step, as a wedged process or a lost node would look to its peers.

``BEIT_SCALE_FAULT=nan_loss@<step>[:<rank>]`` instead makes that rank's loss NaN at that optimizer step,
once (its retry is clean), and ``nan_loss@<step>+`` at every step from there on. ``nan_weights@<step>[:<rank>]``
sets one weight of that rank to NaN after the step, as an overflow in the weights themselves would.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)
POINTS = ("after_step", "before_files", "mid_file", "after_shards", "after_manifest")


def _armed(point: str, step: int, rank: int) -> bool:
    spec = os.environ.get("BEIT_SCALE_FAULT", "")
    if not spec:
        return False
    where, _, rest = spec.partition("@")
    at_step, _, at_rank = rest.partition(":")
    if where in ("nan_loss", "nan_weights", "signal", "hang"):
        return where == point and int(at_step) == step and int(at_rank or 0) == rank
    if where not in POINTS:
        raise ValueError(f"BEIT_SCALE_FAULT={spec!r}: point must be one of {', '.join(POINTS)}")
    return where == point and int(at_step) == step and int(at_rank or 0) == rank


def poison(loss, step: int, rank: int):
    """The loss, or NaN times it where ``nan_loss`` names this step (1-based) and rank."""
    spec = os.environ.get("BEIT_SCALE_FAULT", "")
    if not spec.startswith("nan_loss@"):
        return loss
    at, _, at_rank = spec[len("nan_loss@"):].partition(":")
    if int(at_rank or 0) != rank:
        return loss
    if at.endswith("+"):
        hit = step >= int(at[:-1])
    else:  # once: the retried step (a skipped step keeps its number) gets a finite loss
        hit = step == int(at) and step not in _POISONED
        _POISONED.add(step)
    return loss * float("nan") if hit else loss


_POISONED: set[int] = set()


def maybe_poison_weights(module, step: int, rank: int) -> None:
    """Set the first element of this rank's first non-empty parameter to NaN where ``nan_weights`` says so."""
    if not _armed("nan_weights", step, rank):
        return
    import torch

    for p in module.parameters():
        t = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
        if t.numel():
            with torch.no_grad():
                t.view(-1)[0] = float("nan")
            log.warning("fault hook: a weight of rank %d set to NaN after step %d", rank, step)
            return


def maybe_kill(point: str, step: int, rank: int, cut: Path | None = None) -> None:
    """SIGKILL this process if the fault hook names this point; with ``cut``, first truncate that file."""
    if not _armed(point, step, rank):
        return
    if cut is not None:
        size = cut.stat().st_size
        with open(cut, "r+b") as f:
            f.truncate(size // 2)
    log.warning("fault hook: killing rank %d at %s of step %d", rank, point, step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(step: int, rank: int, signum: int | None) -> None:
    """Send this process ``signum`` (``signal@``) or SIGSTOP (``hang@``) where the fault hook says so."""
    if signum is not None and _armed("signal", step, rank):
        log.warning("fault hook: sending rank %d signal %d after step %d", rank, signum, step)
        os.kill(os.getpid(), signum)
    if _armed("hang", step, rank):
        log.warning("fault hook: freezing rank %d after step %d", rank, step)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
