"""Process-group set-up under torchrun, the `deepspeed` launcher, mpirun, or a plain single process."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_world_size() -> int:
    """World size the launcher announced, read from the environment before any process group exists."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def select_accelerator() -> None:
    """Pick DeepSpeed's accelerator before DeepSpeed is imported: CUDA where present, else the CPU."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed, whatever launched us, and pick this rank's device."""
    select_accelerator()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    under_mpi = "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ
    if not under_mpi and not all(v in os.environ for v in _TORCHRUN_ENV):
        # A plain `beit-scale pretrain` is a world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # DeepSpeed compiles a shared-memory all-reduce with g++ on first use (30-45 s); gloo does the same
        # work here with bit-identical results, so skip the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(auto_mpi_discovery=under_mpi, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(), local_rank)
    return DistInfo(rank, world, local_rank, device)


def destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
