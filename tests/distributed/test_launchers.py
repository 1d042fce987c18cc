"""The jobs through the real CLI on 2 ranks: torchrun for the tokenizer, the deepspeed launcher and mpirun for MIM."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from beit_scale.checkpoint.tokenizer_file import load_tokenizer
from beit_scale.config import load_config
from beit_scale.data import export_fashion_mnist
from tests.distributed.ranks import free_port, rank_env, run_ranks, torchrun

pytestmark = pytest.mark.distributed

TINY = ["model.name=beit_tiny_patch4_32", "engine.ds_config=ds_configs/tiny.json", "data.num_workers=1",
        "train.micro_batch=8", "train.global_batch=16", "train.total_steps=6", "train.log_every=2",
        "train.eval_batches=2", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    return export_fashion_mnist(root, "train", limit=128), export_fashion_mnist(root, "test", limit=64)


def train_tokenizer(fmnist, out) -> list[str]:
    train, val = fmnist
    return torchrun(2, "-m", "beit_scale.cli", "train-tokenizer", "--config", "quickstart_tokenizer",
                    f"run.output_dir={out}", f"data.root={train}", f"data.val_root={val}",
                    "engine.zero_stage=2", "tokenizer.recon_every=3", *TINY)


@pytest.fixture(scope="module")
def tokenizer_run(fmnist, tmp_path_factory):
    """train-tokenizer under torchrun, 2 ranks, ZeRO-2 fp32."""
    out = tmp_path_factory.mktemp("tok")
    return out, run_ranks(train_tokenizer(fmnist, out), timeout=300)


def test_train_tokenizer_under_torchrun_writes_a_loadable_tokenizer(tokenizer_run):
    out, proc = tokenizer_run
    assert "step 6/6 (100%)" in proc.stderr and "codebook_usage" in proc.stderr
    tok = load_tokenizer(out / "tokenizer.safetensors")
    assert (tok.vocab_size, tok.input_size, tok.grid_size) == (128, 32, 8)
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["tokenizer_codebook_usage"] <= 1 and summary["tokenizer_perplexity"] >= 1
    assert summary["eval_images"] == 2 * 8  # eval_batches x micro_batch held-out images
    assert (out / "images" / "reconstructions.png").is_file() and (out / "images" / "recon_step0000003.png").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = load_config(str(out / "config.yaml"))
    assert saved.run.job == "tokenizer" and saved.engine.zero_stage == 2
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0


def logged(out) -> dict[int, dict]:
    """{step: the logged values but the timings (throughput, data wait)}, the last record of each step winning."""
    return {rec["step"]: {k: v for k, v in rec.items() if k not in ("images_per_s", "data_wait", "data_wait_frac")}
            for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_a_preempted_tokenizer_run_resumes_through_the_driver_as_if_never_stopped(tokenizer_run, fmnist, tmp_path):
    """USR2 reaches rank 1 after step 2: both ranks save step 2 and exit 75; the relaunch matches the run
    that was never stopped: every logged value (loss, KL, temperature, codebook usage, lr) and the tokenizer file."""
    full, _ = tokenizer_run
    cmd = train_tokenizer(fmnist, tmp_path)
    preempted = subprocess.run(cmd, env=rank_env(BEIT_SCALE_FAULT="signal@2:1"), capture_output=True, text=True,
                               timeout=300, start_new_session=True)
    assert preempted.returncode != 0 and "preempted at step 2: exiting with 75" in preempted.stderr
    assert "BEIT_SCALE_FAULT=signal@2:1 is set: this run will fail on purpose" in preempted.stderr
    proc = run_ranks(cmd, timeout=300)
    assert "continuing at step 2/6" in proc.stderr
    assert logged(tmp_path) == logged(full) and sorted(logged(full)) == [2, 4, 6]
    resumed, reference = load_file(str(tmp_path / "tokenizer.safetensors")), load_file(str(full / "tokenizer.safetensors"))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert json.loads((tmp_path / "summary.json").read_text())["restarts"] == 1


def test_pretrain_under_the_deepspeed_launcher_zero3_bf16(tokenizer_run, fmnist, tmp_path):
    tok_dir, _ = tokenizer_run
    train, val = fmnist
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain",
           f"run.output_dir={tmp_path}", f"data.root={train}", f"data.val_root={val}",
           f"tokenizer.path={tok_dir / 'tokenizer.safetensors'}", "engine.zero_stage=3", "engine.precision=bf16", *TINY]
    proc = run_ranks(cmd, timeout=300)
    log = proc.stdout + proc.stderr
    assert "step 6/6 (100%)" in log and "mask_acc" in log and "grad_norm" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["eval_masked_tokens"] == 2 * 2 * 8 * 26  # ranks x eval_batches x micro_batch x masked
    for key in ("final_loss", "masked_token_accuracy", "majority_token_accuracy", "images_per_second"):
        assert summary[key] == summary[key]  # not NaN
    # one speed, the training steps' (the final evaluation's time left out of both figures)
    assert summary["tflops"] == pytest.approx(summary["images_per_second"] * summary["flops_per_image"] / 2 / 1e12)
    # the steps' wait for the data loader (rank 0): seconds per step and share of the wall time, also in the log
    assert 0 <= summary["data_wait_s"] < 60 and 0 <= summary["data_wait_fraction"] <= 1 and "data_wait_frac" in log
    weights = load_file(str(tmp_path / "model.safetensors"))  # gathered from ZeRO-3 shards
    assert weights["lm_head.weight"].shape == (128, 96) and "mask_token" in weights
    assert (tmp_path / "images" / "masks.png").is_file()


def test_bad_config_fails_before_any_process_group(fmnist, tmp_path):
    train, _ = fmnist
    cmd = torchrun(2, "-m", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain", f"data.root={train}",
                   f"run.output_dir={tmp_path}", "train.global_batch=64", "tokenizer.path=/nonexistent")
    from tests.distributed.ranks import rank_env
    import subprocess

    proc = subprocess.run(cmd, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train.global_batch=64 must equal train.micro_batch (64) x train.grad_accum (1) x ranks (2) = 128" in proc.stderr
    assert "Initializing TorchBackend" not in proc.stderr and not (tmp_path / "config.yaml").exists()


def test_pretrain_under_mpirun_discovers_ranks_through_mpi(tokenizer_run, fmnist, tmp_path):
    """mpirun sets only OMPI_COMM_WORLD_*; DeepSpeed's MPI discovery (mpi4py) must find 2 ranks."""
    tok_dir, _ = tokenizer_run
    train, val = fmnist
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root", "-x", "DS_ACCELERATOR", "-x",
           "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", "CUDA_VISIBLE_DEVICES",
           sys.executable, "-m", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain",
           f"run.output_dir={tmp_path}", f"data.root={train}", f"data.val_root={val}",
           f"tokenizer.path={tok_dir / 'tokenizer.safetensors'}", *TINY]
    proc = run_ranks(cmd, timeout=240)
    log = proc.stdout + proc.stderr
    assert "launcher: mpirun (MPI discovery)" in log and "step 6/6 (100%)" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    ds = json.loads((tmp_path / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8  # 16 = 8 x 2 ranks
