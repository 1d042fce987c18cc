"""One run per run folder: rank 0 holds a POSIX lock on ``<run>/run.lock`` for as long as its process lives.

The kernel drops the lock when the holder dies (killed, preempted, node gone), so a lock is never stale; the
file keeps the last holder's host, pid and job so that a refused run can say who has the folder, and a run that
takes over a dead holder's folder says whose it was. File systems without POSIX locks get a loud warning.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from beit_scale.checkpoint.layout import RunLayout

log = logging.getLogger(__name__)

_HELD: dict[Path, int] = {}  # lock file -> open descriptor; closing any descriptor of it would drop the lock


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job} since {holder.get('since')}"


def lock_run_folder(layout: RunLayout) -> str | None:
    """Take the run folder's lock for this process (again: a no-op). Returns why not when another run holds it."""
    path = layout.lock
    key = path.resolve()
    if key in _HELD:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _holder(fd)
        os.close(fd)
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return (f"run.output_dir={str(layout.root)!r} is in use by {_describe(holder)}: two runs on one folder "
                    "would overwrite each other's checkpoints and metrics. Wait for it to end, stop it, or choose "
                    "another run.output_dir")
        log.warning("cannot lock %s (%s): this file system has no POSIX locks, so nothing keeps a second run out "
                    "of this folder; make sure only one job uses it", path, err)
        return None
    previous = _holder(fd)
    if previous:
        log.info("run folder lock %s taken over from %s, which is gone", path, _describe(previous))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", ""),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _HELD[key] = fd
    return None
