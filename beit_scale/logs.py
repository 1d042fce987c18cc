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


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once per process; the rank comes from the launcher's environment."""
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # DeepSpeed installs its own handler and logs at INFO on every rank; keep its warnings only.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
