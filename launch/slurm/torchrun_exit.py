"""torchrun, but exiting with the exit code of the first rank that failed (torchrun itself exits 1), and
passing preemption signals on to its ranks (by default USR1/USR2 would end torchrun itself).

launch/slurm/run.sh needs both to tell a checkpointed preemption (every rank exits 75) from a crash.
"""
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def _children(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (torchrun's ranks), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent:
                out.append(int(entry))
    return out


def _forward(signum, frame):
    for pid in _children(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, _forward)
    try:
        main()
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        sys.exit(failure.exitcode if 0 < failure.exitcode < 256 else 1)
