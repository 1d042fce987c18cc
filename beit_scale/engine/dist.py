"""Process-group set-up under torchrun, the `deepspeed` launcher, mpirun, srun, or a plain single process."""
from __future__ import annotations

import logging
import os
import re
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


def _under_mpi() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ


def _under_srun() -> bool:
    """True in a task of an srun step that launched us directly, one task per rank.

    torchrun under srun (one task per node) sets RANK itself, so its environment wins; the batch script
    itself has SLURM_PROCID and SLURM_NTASKS too but no SLURM_STEP_ID, and stays a world of one.
    """
    return ("RANK" not in os.environ and "WORLD_SIZE" not in os.environ and not _under_mpi()
            and all(os.environ.get(v, "").isdigit() for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
            and "SLURM_STEP_ID" in os.environ)


def launched_world_size() -> int:
    """World size the launcher announced, read from the environment before any process group exists."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if _under_srun():
        return int(os.environ["SLURM_NTASKS"])
    return 1


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list, as `scontrol show hostnames` would print it first.

    >>> first_host("gpu[007-012,020],cpu1")
    'gpu007'
    """
    entry = re.split(r",(?![^\[]*\])", nodelist.strip(), maxsplit=1)[0]  # a comma outside brackets ends it
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)
    if not host or any(c in host for c in "[],"):
        raise ValueError(f"cannot read the first host of the Slurm node list {nodelist!r}")
    return host


def slurm_rendezvous(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed variables for an srun task, derived from its SLURM_* variables.

    Every task computes the same MASTER_ADDR (the step's first node) and MASTER_PORT (the environment's,
    else 20000 + job id mod 20000), so no task has to tell the others.
    """
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("srun task without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: cannot find the master node")
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"],
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist), "MASTER_PORT": port}


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

    under_mpi = _under_mpi()
    if under_mpi:
        launcher = "mpirun (MPI discovery)"
    elif all(v in os.environ for v in _TORCHRUN_ENV):
        launcher = "torchrun/deepspeed (RANK, WORLD_SIZE, MASTER_ADDR from the environment)"
    elif _under_srun():
        os.environ.update(slurm_rendezvous(dict(os.environ)))
        launcher = f"srun, one task per rank (master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})"
    else:
        # A plain `beit-scale pretrain` is a world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        launcher = "none (a single process)"
    log.info("launcher: %s", launcher)
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
