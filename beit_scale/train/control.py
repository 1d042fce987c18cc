"""Run control across ranks: preemption signals and a heartbeat watchdog.

Preemption: the handler of ``train.preempt_signal`` (Slurm sends it before a time limit with
``--signal=USR2@180``, and to a preempted job) only sets a flag. Every ``train.preempt_check_every`` steps
the ranks all-reduce their flags; once any rank has one, all save a checkpoint together at that step
boundary and leave with :data:`PREEMPTED_EXIT`, which the launch scripts answer with ``scontrol requeue``.

Watchdog: a thread per rank writes that rank's heartbeat (host, pid, last finished step, time) every few
seconds and reads the next rank's. A rank that stops (killed, frozen, its node gone) is named by its
neighbour within ``train.heartbeat_timeout``; a rank whose own steps stop for ``train.stall_timeout`` (a
collective that never completes) names itself. Either way the process exits with :data:`WATCHDOG_EXIT`, so
the launcher tears the job down instead of waiting for the wall-clock limit.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a checkpoint of this step is committed; requeue the same command
WATCHDOG_EXIT = 74


class Preempted(Exception):
    """All ranks saved a checkpoint after a preemption signal; the process should exit with PREEMPTED_EXIT."""


_early_signal = False  # the preemption signal arrived before the training loop started


def _signum(name: str) -> int:
    return getattr(signal, "SIG" + name.upper().removeprefix("SIG"))


def _note_early(signum, frame) -> None:
    global _early_signal
    _early_signal = True


def catch_early(name: str) -> None:
    """Install a flag-only handler for the preemption signal at process start: during imports, engine set-up
    and resume its default action would kill the rank; :class:`StopSignal` picks the flag up."""
    if name:
        signal.signal(_signum(name), _note_early)


class StopSignal:
    """Sets a flag when ``name`` (e.g. USR2) arrives; :meth:`agreed` tells every rank whether any rank got it."""

    def __init__(self, name: str, check_every: int, device: torch.device):
        self.name, self.check_every, self.device = name, check_every, device
        self.flag = _early_signal
        self.signum = None
        self.group = None  # the ranks agree over gloo on a host tensor: no device sync, whatever the backend
        self.buffer = torch.zeros(1, dtype=torch.int32)
        if name:
            self.signum = _signum(name)
            self.previous = signal.signal(self.signum, self._handle)
            if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")  # collective: every rank builds its StopSignal

    def _handle(self, signum, frame) -> None:  # only a flag: the step in flight finishes undisturbed
        self.flag = True

    def agreed(self, step: int) -> bool:
        """Collective every ``check_every`` steps (a one-integer all-reduce in host memory); False in between."""
        if not self.name or step % self.check_every:
            return False
        self.buffer[0] = int(self.flag)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.buffer, op=dist.ReduceOp.MAX, group=self.group)
        return bool(self.buffer.numpy()[0])  # host memory: nothing waits for the device

    def close(self) -> None:
        if self.name:
            signal.signal(self.signum, self.previous)


class Heartbeat:
    """This rank's heartbeat file and the watchdog thread that also watches the next rank's."""

    def __init__(self, path_of, rank: int, world: int, timeout: float, stall_timeout: float):
        self.path_of, self.rank, self.world = path_of, rank, world
        self.timeout, self.stall_timeout = timeout, stall_timeout
        self.step = 0
        self.started = self.last_step_time = time.time()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        self.interval = max(0.5, min(30.0, (timeout or stall_timeout or 120) / 4))
        self.min_gap = self.interval / 10
        self.written = 0.0
        path_of(rank).parent.mkdir(parents=True, exist_ok=True)
        self._write(done=False)
        if timeout > 0 or stall_timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="beit-scale-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """The main loop finished optimizer step ``step``; written at once unless the file is fresher than
        ``min_gap`` (a small write at most every few seconds per rank; the thread writes the rest)."""
        self.step, self.last_step_time = step, time.time()
        if self.last_step_time - self.written >= self.min_gap:
            self._write(done=False)

    def _write(self, done: bool) -> None:
        with self._lock:
            path = self.path_of(self.rank)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({
                "rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step,
                "last_step_time": self.last_step_time, "alive_time": time.time(), "done": done}))
            os.replace(tmp, path)  # no fsync: a heartbeat is worthless after a crash of the node anyway
            self.written = time.time()

    def _watch(self) -> None:
        neighbour = (self.rank + 1) % self.world
        while not self._stop.wait(self.interval):
            self._write(done=False)
            now = time.time()
            if self.stall_timeout > 0 and now - self.last_step_time > self.stall_timeout:
                self._fail(f"rank {self.rank} ({self.host}, pid {self.pid}) finished no step for "
                           f"{now - self.last_step_time:.0f}s (train.stall_timeout={self.stall_timeout:g}); last "
                           f"finished step {self.step}: a collective is waiting for a rank that will not come")
            if self.timeout > 0 and neighbour != self.rank:
                peer = read_heartbeat(self.path_of(neighbour))
                if peer is not None and peer["alive_time"] < self.started - self.interval:
                    peer = None  # left by an earlier run of this job
                if peer is not None and peer["done"]:
                    continue
                last = peer["alive_time"] if peer is not None else self.started
                if now - last > self.timeout:
                    where = f"({peer['host']}, pid {peer['pid']}) at step {peer['step']}" if peer else "(never reported)"
                    self._fail(f"rank {neighbour} {where} gave no sign of life for {now - last:.0f}s "
                               f"(train.heartbeat_timeout={self.timeout:g}); it died or hangs. This rank "
                               f"({self.rank}) is at step {self.step}")

    def _fail(self, message: str) -> None:
        log.error("watchdog: %s; stopping the job (exit %d)", message, WATCHDOG_EXIT)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(WATCHDOG_EXIT)

    def close(self) -> None:
        """This rank is done (finished or leaving with the others): its neighbour stops watching it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._write(done=True)


def read_heartbeat(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def heartbeat_report(paths: list[Path], now: float | None = None) -> str:
    """One line per rank: host, pid, last finished step, seconds since its last sign of life."""
    now = time.time() if now is None else now
    lines = []
    for path in paths:
        hb = read_heartbeat(path)
        if hb is None:
            lines.append(f"{path.name}: unreadable")
            continue
        state = "done" if hb["done"] else f"last seen {now - hb['alive_time']:.0f}s ago"
        lines.append(f"rank {hb['rank']}: {hb['host']} pid {hb['pid']}, last finished step {hb['step']}, {state}")
    return "\n".join(lines) or "no heartbeat files"
