"""torchrun, but exiting with the exit code of the first rank that failed (torchrun itself exits 1).

launch/slurm/run.sh needs it to tell a checkpointed preemption (every rank exits 75) from a crash.
"""
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        sys.exit(failure.exitcode if 0 < failure.exitcode < 256 else 1)
