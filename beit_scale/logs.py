"""Logging set-up: rank 0 logs INFO to the console; other ranks only warnings and errors, tagged with their rank."""
from __future__ import annotations

import logging
import os
import sys


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= logging.WARNING


def _srun_rank() -> str:
    """SLURM_PROCID inside an srun step (the batch script has one too, but no SLURM_STEP_ID)."""
    return os.environ.get("SLURM_PROCID", "0") if "SLURM_STEP_ID" in os.environ else "0"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once per process; the rank comes from the launcher's environment."""
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", _srun_rank())))
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # DeepSpeed installs its own handler and logs at INFO on every rank; keep its warnings only.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
