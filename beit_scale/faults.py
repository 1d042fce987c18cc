"""Test hook: make a run fail at a named point, as the failures the tests reproduce would.

``BEIT_SCALE_FAULT=<point>@<step>[:<rank>]`` kills rank ``rank`` (default 0) with SIGKILL when the run
reaches ``point`` at optimizer step ``step``. Points: ``after_step`` (a step finished, nothing saved),
``before_files`` (a save began, nothing written), ``mid_file`` (the shards are written but one is cut
in half, as a write interrupted part way), ``after_shards`` (every rank's files, no manifest),
``after_manifest`` (manifest written, pointer not replaced).

``signal@<step>[:<rank>]`` sends that rank its own preemption signal after the step, as Slurm would (the
handler and the agreement are the real ones). ``hang@<step>[:<rank>]`` freezes that rank with SIGSTOP after
the step, as a wedged process or a lost node would look to its peers.

``nan_loss@<step>[:<rank>]`` makes that rank's loss NaN at that optimizer step, once (its retry is clean),
and ``nan_loss@<step>+`` at every step from there on. ``nan_weights@<step>[:<rank>]`` sets one weight of that
rank to NaN after the step, as an overflow in the weights themselves would.

The variable is read once, by :func:`from_env` when a run starts; a malformed value is a ValueError then.
Without it every hook is a method of :class:`NoFaults`, which does nothing.
"""
from __future__ import annotations

import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
ENV = "BEIT_SCALE_FAULT"
KILL_POINTS = ("after_step", "before_files", "mid_file", "after_shards", "after_manifest")
POINTS = (*KILL_POINTS, "signal", "hang", "nan_loss", "nan_weights")


class NoFaults:
    """The hooks production code calls; all do nothing."""

    def kill(self, point: str, step: int, rank: int, cut: Path | None = None) -> None:
        """SIGKILL this process at ``point`` of ``step`` (with ``cut``: truncate that file first)."""

    def after_step(self, step: int, rank: int, signum: int | None, module) -> None:
        """After optimizer step ``step``: kill, signal, freeze or poison weights where the plan says so."""

    def poison(self, loss, step: int, rank: int):
        """The loss of micro batches of optimizer step ``step`` (1-based), NaN where the plan says so."""
        return loss


@dataclass
class Fault(NoFaults):
    """One planned fault, parsed from ``BEIT_SCALE_FAULT``."""

    point: str
    step: int
    rank: int = 0
    onward: bool = False  # nan_loss@N+: every step from N on

    def __post_init__(self):
        self._poisoned: set[int] = set()

    def _at(self, point: str, step: int, rank: int) -> bool:
        return point == self.point and step == self.step and rank == self.rank

    def kill(self, point: str, step: int, rank: int, cut: Path | None = None) -> None:
        if not self._at(point, step, rank):
            return
        if cut is not None:
            size = cut.stat().st_size
            with open(cut, "r+b") as f:
                f.truncate(size // 2)
        log.warning("fault hook: killing rank %d at %s of step %d", rank, point, step)
        _flush_logs()
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int, rank: int, signum: int | None, module) -> None:
        self.kill("after_step", step, rank)
        if signum is not None and self._at("signal", step, rank):
            log.warning("fault hook: sending rank %d signal %d after step %d", rank, signum, step)
            os.kill(os.getpid(), signum)
        if self._at("hang", step, rank):
            log.warning("fault hook: freezing rank %d after step %d", rank, step)
            _flush_logs()
            os.kill(os.getpid(), signal.SIGSTOP)
        if self._at("nan_weights", step, rank):
            _poison_weights(module, step, rank)

    def poison(self, loss, step: int, rank: int):
        if self.point != "nan_loss" or rank != self.rank:
            return loss
        if self.onward:
            hit = step >= self.step
        else:  # once: the retried step (a skipped step keeps its number) gets a finite loss
            hit = step == self.step and step not in self._poisoned
            self._poisoned.add(step)
        return loss * float("nan") if hit else loss


def parse(spec: str) -> NoFaults:
    """The hooks for a ``BEIT_SCALE_FAULT`` value ('' -> :class:`NoFaults`); a malformed one is a ValueError."""
    if not spec:
        return NoFaults()
    match = re.fullmatch(r"([a-z_]+)@(\d+)(\+?)(?::(\d+))?", spec)
    if match is None or match.group(1) not in POINTS or (match.group(3) and match.group(1) != "nan_loss"):
        raise ValueError(f"{ENV}={spec!r} is not a fault: use <point>@<step>[:<rank>] with a point of "
                         f"{', '.join(POINTS)} (nan_loss@<step>+ for every step from there on), or unset it")
    point, step, onward, rank = match.groups()
    return Fault(point, int(step), int(rank or 0), bool(onward))


def from_env() -> NoFaults:
    """The hooks for this process, read once at start-up; a set variable is logged loudly."""
    hooks = parse(os.environ.get(ENV, ""))
    if isinstance(hooks, Fault):
        log.warning("%s=%s is set: this run will fail on purpose (a test hook); unset it for real training",
                    ENV, os.environ[ENV])
    return hooks


def _poison_weights(module, step: int, rank: int) -> None:
    """Set the first element of this rank's first non-empty parameter to NaN."""
    import torch

    for p in module.parameters():
        t = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
        if t.numel():
            with torch.no_grad():
                t.view(-1)[0] = float("nan")
            log.warning("fault hook: a weight of rank %d set to NaN after step %d", rank, step)
            return


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
