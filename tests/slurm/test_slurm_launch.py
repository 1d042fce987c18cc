"""launch/pretrain.sbatch through a real two-node Slurm (n1, n2 on this machine), in both launcher modes:
srun one task per rank (SLURM_PROCID discovery) and one torchrun per node."""
import json
import re
import subprocess
import time

import pytest

from tests.distributed.ranks import ROOT
from tests.distributed.test_launchers import TINY

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.timeout(240)]
JOB_TIMEOUT_S = 150


def job_env(cluster, env_extra):
    """What sbatch --export=ALL hands the job: this cluster, CPU ranks, the project's venv, ``env_extra``."""
    env = dict(cluster.env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               BEIT_SCALE_VENV=str(ROOT / ".venv"))
    env.update(env_extra)
    env.pop("SLURM_JOB_ID", None)  # the topology must come from the test job, not an outer allocation
    return env


def submit_and_wait(cluster, args, env_extra, timeout=JOB_TIMEOUT_S):
    """sbatch, then poll scontrol until the job ends; returns (state, exit code, job id)."""
    env = job_env(cluster, env_extra)
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                              timeout=30).stdout
        state = re.search(r"JobState=(\S+)", info).group(1)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"):
            return state, re.search(r"ExitCode=(\S+)", info).group(1), job_id
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    pytest.fail(f"Slurm job {job_id} did not end within {timeout}s")


@pytest.mark.parametrize("launcher", ["torchrun"])  # srun mode: tests/slurm/test_preemption.py
def test_pretrain_sbatch_trains_one_rank_on_each_of_two_nodes(slurm_cluster, inputs, tmp_path, launcher):
    train, val, tok = inputs
    out = tmp_path / "run"
    job_log = tmp_path / "job-%j.out"
    args = ["-N2", "--ntasks-per-node=1", "--gpus-per-node=0", "--time=5", "--export=ALL", f"--output={job_log}",
            "launch/pretrain.sbatch", "--config", "quickstart_pretrain", f"run.output_dir={out}",
            f"data.root={train}", f"data.val_root={val}", f"tokenizer.path={tok}", *TINY]
    state, exit_code, job_id = submit_and_wait(slurm_cluster, args, {"BEIT_SCALE_LAUNCHER": launcher})
    text = (tmp_path / f"job-{job_id}.out").read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), text[-6000:]

    assert "restart count 0" in text and "nodes 2 (n[1-2]), tasks/node 1, GPUs/node 1" in text
    assert "pretrain finished" in text and "step 6/6 (100%)" in text
    detected = "launcher: srun, one task per rank" if launcher == "srun" else "launcher: torchrun/deepspeed"
    assert detected in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    # Each emulated node's slurmd launched a task of the training step (step 0 in srun mode, the only step).
    assert_ran_on_both_nodes(slurm_cluster, job_id)


def assert_ran_on_both_nodes(cluster, job_id):
    """Each emulated node's slurmd launched a task of the job's first step (the training step)."""
    for node in ("n1", "n2"):
        slurmd_log = (cluster.folder / "log" / f"slurmd-{node}.log").read_text()
        assert f"launch task StepId={job_id}.0 " in slurmd_log, f"no task of job {job_id} ran on {node}"


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for the training processes: exit code by run, to drive launch/slurm/run.sh's requeue contract.
if [[ "$*" == "-m beit_scale.cli heartbeat --help" ]]; then exit 0; fi
if [[ "$1 $2 $3" == "-m beit_scale.cli heartbeat" ]]; then echo "$4" > "$STUB_DIR/heartbeat_called"; exit 0; fi
if [[ "${SLURM_RESTART_COUNT:-0}" -lt "$STUB_PREEMPTIONS" ]]; then exit 75; fi
echo "stub trained, restart ${SLURM_RESTART_COUNT:-0}"
exit "$STUB_FINAL_CODE"
"""


def stub_venv(folder):
    """A BEIT_SCALE_VENV whose activate puts the stub `python` first on PATH."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text(STUB_PYTHON)
    (folder / "bin" / "python").chmod(0o755)
    (folder / "bin" / "activate").write_text(f'export PATH="{folder / "bin"}:$PATH"\n')
    return folder


@pytest.mark.parametrize("preemptions, budget, final_code, want", [
    (1, 20, 0, ("COMPLETED", "0:0")),  # exit 75 -> scontrol requeue -> restart 1 trains to the end
    (1, 0, 0, ("FAILED", "75:0")),  # no requeue budget: the job ends with 75
    (0, 20, 3, ("FAILED", "3:0")),  # a crash: srun's code, and the heartbeat records it
])
def test_sbatch_requeue_contract(slurm_cluster, tmp_path, preemptions, budget, final_code, want):
    venv = stub_venv(tmp_path / "venv")
    args = ["-N1", "--ntasks-per-node=1", "--gpus-per-node=0", "--time=5", "--export=ALL",
            f"--output={tmp_path / 'job-%j.out'}", "launch/pretrain.sbatch", "--config", "quickstart_pretrain"]
    extra = {"STUB_DIR": str(tmp_path), "STUB_PREEMPTIONS": str(preemptions), "STUB_FINAL_CODE": str(final_code),
             "BEIT_SCALE_MAX_REQUEUES": str(budget), "BEIT_SCALE_RUN_DIR": str(tmp_path / "run"),
             "BEIT_SCALE_VENV": str(venv)}
    state, exit_code, job_id = submit_and_wait(slurm_cluster, args, extra)
    text = (tmp_path / f"job-{job_id}.out").read_text()
    assert (state, exit_code) == want, text
    if want[0] == "COMPLETED":
        assert "requeueing (restart 1 of at most 20)" in text and "restart count 1" in text
        assert "stub trained, restart 1" in text and "pretrain finished" in text
    elif final_code == 0:
        assert "the requeue budget is spent (0 of BEIT_SCALE_MAX_REQUEUES=0)" in text
    else:
        assert "srun exited 3" in text
        assert (tmp_path / "heartbeat_called").read_text().strip() == str(tmp_path / "run")
