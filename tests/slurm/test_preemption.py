"""Preemption and failures through the real two-node Slurm: a USR2 from Slurm makes both ranks save and the
job requeue itself, and the requeued job finishes with the losses of an uninterrupted run; a killed rank
fails the job at once, and the job's output names the rank and its last step."""
import json
import re
import subprocess
import time

import pytest

from tests.distributed.ranks import ROOT, run_ranks, torchrun
from tests.distributed.test_launchers import TINY
from tests.slurm.test_slurm_launch import assert_ran_on_both_nodes, job_env

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.timeout(300)]
STEPS = 30
RUN = [*TINY, f"train.total_steps={STEPS}", "train.log_every=1", "train.preempt_check_every=1",
       "checkpoint.every_steps=10", "data.val_root="]


def job_state(cluster, job_id):
    info = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=cluster.env, capture_output=True,
                          text=True, timeout=30).stdout
    return re.search(r"JobState=(\S+)", info).group(1), re.search(r"ExitCode=(\S+)", info).group(1), \
        int(re.search(r"Restarts=(\d+)", info).group(1))


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def logged_steps(out):
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def submit(cluster, inputs, tmp_path, out, extra_env=None, *overrides):
    train, _, tok = inputs
    args = ["sbatch", "--parsable", "-N2", "--ntasks-per-node=1", "--gpus-per-node=0", "--time=5", "--export=ALL",
            f"--output={tmp_path / 'job.out'}", "launch/pretrain.sbatch", "--config", "quickstart_pretrain",
            f"run.output_dir={out}", f"data.root={train}", f"tokenizer.path={tok}", *RUN, *overrides]
    env = job_env(cluster, extra_env or {})  # run.sh finds the run folder from the recipe for its report
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_slurm_signal_saves_requeues_and_the_requeued_job_matches_an_uninterrupted_run(slurm_cluster, inputs,
                                                                                        tmp_path):
    out = tmp_path / "run"
    job_id = submit(slurm_cluster, inputs, tmp_path, out)
    wait_for(lambda: len(logged_steps(out)) >= 3, 120, "3 logged steps")
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_cluster.env, check=True, timeout=30)
    state = wait_for(lambda: (s := job_state(slurm_cluster, job_id))[0] in ("COMPLETED", "FAILED", "CANCELLED")
                     and s, 180, "the requeued job to end")
    text = (tmp_path / "job.out").read_text()
    assert state == ("COMPLETED", "0:0", 1), text[-6000:]
    preempted_at = int(re.search(r"preempted \(USR2\): checkpoint of step (\d+)/30 committed", text).group(1))
    assert 3 <= preempted_at < STEPS
    assert "ranks checkpointed and exited 75: requeueing (restart 1 of at most 20)" in text
    assert "restart count 1" in text and "Slurm restart count 1" in text
    assert f"resumed from {out / 'checkpoints'}/step_{preempted_at:09d} at step {preempted_at}" in text
    assert "step 30/30 (100%)" in text and "pretrain finished" in text
    assert "launcher: srun, one task per rank" in text and "nodes 2 (n[1-2]), tasks/node 1" in text
    assert_ran_on_both_nodes(slurm_cluster, job_id)

    train, _, tok = inputs
    full = tmp_path / "full"
    run_ranks(torchrun(2, "-m", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain",
                       f"run.output_dir={full}", f"data.root={train}", f"tokenizer.path={tok}", *RUN), timeout=240)
    assert losses(out) == losses(full)  # fp32, same 2 ranks: exact


def test_a_job_preempted_by_a_higher_partition_saves_is_requeued_and_finishes(slurm_cluster, inputs, tmp_path):
    """Real preemption: a job in the "urgent" partition needs every CPU of both nodes; Slurm sends the
    running training job USR2, SIGTERM after the 10 s grace time, and requeues it. The ranks checkpoint on
    USR2, and the requeued job resumes there once the urgent job is done."""
    out = tmp_path / "run"
    job_id = submit(slurm_cluster, inputs, tmp_path, out, None, "train.total_steps=40")
    wait_for(lambda: len(logged_steps(out)) >= 3, 120, "3 logged steps")
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-N2", "--ntasks-per-node=2",
                             "--gpus-per-node=0", "--time=2", f"--output={tmp_path / 'urgent.out'}",
                             "--wrap", "sleep 2"], env=slurm_cluster.env, capture_output=True, text=True, timeout=30)
    assert urgent.returncode == 0, urgent.stderr
    state = wait_for(lambda: (s := job_state(slurm_cluster, job_id))[0] in ("COMPLETED", "FAILED", "CANCELLED")
                     and s, 240, "the preempted job to finish")
    text = (tmp_path / "job.out").read_text()
    assert state[0] == "COMPLETED" and state[2] >= 1, text[-6000:]
    assert job_state(slurm_cluster, urgent.stdout.strip())[0] == "COMPLETED"
    saved = int(re.search(r"preempted \(USR2\): checkpoint of step (\d+)/40 committed", text).group(1))
    assert f"resumed from {out / 'checkpoints'}/step_{saved:09d} at step {saved}" in text
    assert "step 40/40 (100%)" in text and "pretrain finished" in text


def failed_job(cluster, inputs, tmp_path, fault):
    """Submit the 2-node run with ``fault``; returns the job output once it ended, after checking that it
    failed without a requeue within 90 s (minutes before its 5-minute limit)."""
    start = time.monotonic()
    # A short heartbeat timeout also makes the heartbeat files follow every step of this fast tiny run.
    job_id = submit(cluster, inputs, tmp_path, tmp_path / "run", {"BEIT_SCALE_FAULT": fault},
                    "train.heartbeat_timeout=4")
    state = wait_for(lambda: (s := job_state(cluster, job_id))[0] in ("COMPLETED", "FAILED", "CANCELLED") and s,
                     120, "the job to fail")
    text = (tmp_path / "job.out").read_text()
    assert state[0] == "FAILED" and state[2] == 0, text[-6000:]  # failed, not requeued
    assert time.monotonic() - start < 90
    return text


def test_a_killed_rank_fails_the_job_quickly_and_names_rank_and_step(slurm_cluster, inputs, tmp_path):
    text = failed_job(slurm_cluster, inputs, tmp_path, "after_step@4:1")
    assert "fault hook: killing rank 1 at after_step of step 4" in text
    assert re.search(r"srun: error: n2: task 1: Killed", text), text[-4000:]
    # The heartbeat is written at most every heartbeat_timeout/40 s: it may lag the kill by a step.
    assert re.search(r"rank 1: \S+ pid \d+, last finished step [34], last seen \d+s ago", text), text[-4000:]


def test_a_frozen_rank_is_named_by_its_neighbour_and_the_job_fails_quickly(slurm_cluster, inputs, tmp_path):
    """SIGSTOP on rank 1 (a wedged process or a node gone quiet): rank 0 blocks in the next collective, its
    watchdog sees rank 1's heartbeat go stale, names it with its step and exits 74; srun ends the job."""
    text = failed_job(slurm_cluster, inputs, tmp_path, "hang@4:1")
    assert "fault hook: freezing rank 1 after step 4" in text
    assert re.search(r"\[rank 0\] ERROR beit_scale.train.control: watchdog: rank 1 \(\S+, pid \d+\) at step [34] gave "
                     r"no sign of life for \d+s \(train.heartbeat_timeout=4\); it died or hangs", text), text[-4000:]
    assert "srun: error: n1: task 0: Exited with exit code 74" in text
