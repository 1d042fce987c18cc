"""`beit-scale pipeline` through the real two-node Slurm: tokenizer -> pretrain -> consolidate -> finetune ->
linear probe run in order with Slurm dependencies; a failed stage cancels the stages after it; a resubmission
skips what is done."""
import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.distributed.ranks import ROOT
from tests.distributed.test_launchers import TINY
from tests.slurm.test_slurm_launch import job_env

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.timeout(420)]
ONE_RANK = [*TINY, "train.grad_accum=2", "train.total_steps=4"]  # global batch 16 = 8 x 2 x 1 rank
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
STAGES = ["tokenizer", "pretrain", "consolidate", "finetune", "probe"]


def write_chain(path, name, root, inputs, pretrain_data=None, tokenizer_dir=None):
    train, val, _ = inputs
    chain = {"name": name, "sbatch": ["-N1", "--ntasks-per-node=1", "--gpus-per-node=0", "--time=5",
                                      "--export=ALL", f"--output={root}/%x-%j.out"],
             "stages": [
                 {"name": "tokenizer", "job": "train-tokenizer", "config": "quickstart_tokenizer",
                  "overrides": [f"run.output_dir={tokenizer_dir or root / 'tok'}", f"data.root={train}", *ONE_RANK]},
                 {"name": "pretrain", "job": "pretrain", "config": "quickstart_pretrain",
                  "overrides": [f"run.output_dir={root}/{name}_pt", f"data.root={pretrain_data or train}",
                                "tokenizer.path={tokenizer}/tokenizer.safetensors", *ONE_RANK]},
                 {"name": "consolidate", "job": "consolidate",
                  "args": ["{pretrain}", "{pretrain}/consolidated/model_fp32.safetensors"]},
                 {"name": "finetune", "job": "finetune", "config": "finetune_quickstart",
                  "overrides": [f"run.output_dir={root}/{name}_ft", f"data.root={train}", f"data.val_root={val}",
                                "finetune.init_from={consolidate}/model_fp32.safetensors", *ONE_RANK]},
                 {"name": "probe", "job": "linprobe", "config": "linprobe_quickstart",
                  "overrides": [f"run.output_dir={root}/{name}_lp", f"data.root={train}", f"data.val_root={val}",
                                "finetune.init_from={consolidate}/model_fp32.safetensors", *ONE_RANK]},
             ]}
    path.write_text(yaml.safe_dump(chain))
    return path


def pipeline(cluster, chain):
    proc = subprocess.run([sys.executable, "-m", "beit_scale.cli", "pipeline", str(chain)], cwd=ROOT,
                          env=job_env(cluster, {}), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dict(re.findall(r"^(\w+): (\w+)", proc.stdout, re.M)), re.findall(r"submitted (\d+)", proc.stdout)


def job(cluster, job_id):
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=cluster.env, capture_output=True,
                          text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def wait_all(cluster, ids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [job(cluster, i) for i in ids]
        if all(j.get("JobState") in ENDED for j in jobs):
            return jobs
        time.sleep(1)
    pytest.fail(f"jobs {ids} did not all end within {timeout}s: {[j.get('JobState') for j in jobs]}")


_TOKENIZER = {}


def test_pipeline_runs_stages_in_order_then_a_resubmission_skips_them(slurm_cluster, inputs, tmp_path):
    chain = write_chain(tmp_path / "chain.yaml", "tiny", tmp_path, inputs)
    _TOKENIZER["done"] = tmp_path / "tok"  # the next test's chain starts with this stage, done
    status, ids = pipeline(slurm_cluster, chain)
    assert status == dict.fromkeys(STAGES, "submitted")
    jobs = wait_all(slurm_cluster, ids, 360)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("tiny.*.out")))
    assert [j["JobState"] for j in jobs] == ["COMPLETED"] * 5, logs[-6000:]
    for before, after in zip(jobs, jobs[1:]):
        assert after["StartTime"] >= before["EndTime"]  # each stage began after the one before it ended
    assert (tmp_path / "tiny_pt" / "consolidated" / "model_fp32.safetensors").is_file()
    summary = json.loads((tmp_path / "tiny_ft" / "summary.json").read_text())
    assert summary["steps"] == 4
    ft_config = yaml.safe_load((tmp_path / "tiny_ft" / "config.yaml").read_text())
    assert ft_config["finetune"]["init_from"] == str(tmp_path / "tiny_pt" / "consolidated" / "model_fp32.safetensors")
    # the `job: linprobe` stage ran linear probing (launch/linprobe.sbatch), not a full fine-tune
    probe = json.loads((tmp_path / "tiny_lp" / "summary.json").read_text())
    assert probe["probe_block"] == 3 and probe["steps"] == 4 and "linear probe of beit_tiny_patch4_32" in logs
    assert yaml.safe_load((tmp_path / "tiny_lp" / "config.yaml").read_text())["run"]["job"] == "linprobe"

    status, ids = pipeline(slurm_cluster, chain)  # everything is done: nothing is submitted
    assert status == dict.fromkeys(STAGES, "done") and ids == []


def test_a_failed_stage_cancels_the_stages_after_it(slurm_cluster, inputs, tmp_path):
    """Pretraining fails (its data folder is missing): consolidate and finetune never run. The tokenizer
    stage is the previous test's, done, so it is skipped (or, run alone, trained first)."""
    chain = write_chain(tmp_path / "chain.yaml", "broken", tmp_path, inputs, pretrain_data=tmp_path / "missing",
                        tokenizer_dir=_TOKENIZER.get("done"))
    status, ids = pipeline(slurm_cluster, chain)
    assert list(status.values())[1:] == ["submitted"] * 4
    jobs = wait_all(slurm_cluster, ids, 240)[-4:]
    states = [j["JobState"] for j in jobs]
    assert states == ["FAILED", "CANCELLED", "CANCELLED", "CANCELLED"], states
    assert all(j["Reason"] == "DependencyNeverSatisfied" or j["RunTime"] == "00:00:00" for j in jobs[1:])
    assert not (tmp_path / "broken_pt" / "consolidated").exists() and not (tmp_path / "broken_ft").exists()
    assert not (tmp_path / "broken_lp").exists()


def test_dry_run_sees_a_stage_already_queued_as_a_real_submission_does(slurm_cluster, tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"name": "dry", "stages": [
        {"name": "tok", "job": "train-tokenizer", "config": "quickstart_tokenizer",
         "overrides": [f"run.output_dir={tmp_path / 'tok'}"]}]}))
    held = subprocess.run(["sbatch", "--parsable", "--hold", "--job-name=dry.tok", f"--output={tmp_path}/held.out",
                           "--wrap", "sleep 1"], env=slurm_cluster.env, capture_output=True, text=True, timeout=30)
    assert held.returncode == 0, held.stderr
    job_id = held.stdout.strip().split(";")[0]
    try:
        proc = subprocess.run([sys.executable, "-m", "beit_scale.cli", "pipeline", str(path), "--dry-run"], cwd=ROOT,
                              env=job_env(slurm_cluster, {}), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"tok: queued {job_id}" in proc.stdout
    finally:
        subprocess.run(["scancel", job_id], env=slurm_cluster.env, timeout=30)
