"""Rank discovery from the launcher's environment: torchrun wins, then MPI, then an srun step."""
import pytest

from beit_scale.engine import dist
from beit_scale.engine.dist import first_host, launched_world_size, slurm_rendezvous

SRUN_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[007-014]", "SLURM_STEP_NODELIST": "gpu[007-014]"}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
               *SRUN_TASK)


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("nodelist, host", [
    ("n1", "n1"), ("n[1-2]", "n1"), ("gpu[007-012,020],cpu1", "gpu007"), ("a1,b[3-4]", "a1"),
    ("rack[2-3]-n[01-04]", "rack2-n01"), ("node-[5,7]", "node-5"), ("n[10,2-3]", "n10"),
])
def test_first_host_matches_scontrol_show_hostnames(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_task_gets_rank_world_local_rank_and_a_shared_master():
    env = slurm_rendezvous(SRUN_TASK)
    assert env == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                   "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert slurm_rendezvous({**SRUN_TASK, "MASTER_PORT": "29400"})["MASTER_PORT"] == "29400"


def test_world_size_before_the_process_group(clean_env):
    assert launched_world_size() == 1
    for var, value in SRUN_TASK.items():
        clean_env.setenv(var, value)
    assert launched_world_size() == 16 and dist._under_srun()
    clean_env.delenv("SLURM_STEP_ID")  # the batch script itself: a world of one
    assert launched_world_size() == 1 and not dist._under_srun()
    clean_env.setenv("SLURM_STEP_ID", "0")
    clean_env.setenv("RANK", "3")  # torchrun under srun, one task per node: torchrun's variables win
    clean_env.setenv("WORLD_SIZE", "4")
    assert launched_world_size() == 4 and not dist._under_srun()
