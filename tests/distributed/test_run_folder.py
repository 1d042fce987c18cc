"""Run folders no one can trick, tried as a careless or hostile user would, on one CPU rank with the tiny
recipe: planted files, a new run on an old folder, a changed config, a second run, lost manifests, flipped
bytes and stray folders. Each relaunch is the real CLI; a run that is refused writes nothing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from beit_scale.checkpoint.files import committed_tags, sha256
from tests.distributed.ranks import ROOT, rank_env
from tests.distributed.tampering import Planted

pytestmark = pytest.mark.distributed
RELAUNCH_TIMEOUT_S = 180  # one relaunch takes about 8 s on 2 idle cores


def command(inputs, out, *extra):
    data, tok = inputs
    return [sys.executable, "-m", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain",
            f"run.output_dir={out}", f"data.root={data}", f"tokenizer.path={tok}", "data.num_workers=0",
            "train.micro_batch=4", "train.global_batch=4", "train.total_steps=4", "train.log_every=1",
            "optim.warmup_steps=1", "checkpoint.every_steps=1", "checkpoint.keep_last=4", *extra]


def launch(inputs, out, *extra, env=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command(inputs, out, *extra), cwd=ROOT, env=env or rank_env(), capture_output=True,
                              text=True, timeout=RELAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"hung for {RELAUNCH_TIMEOUT_S}s\n{err.stderr}")


def ok(proc) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """A finished 4-step run with a committed checkpoint at every step."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(launch(inputs, out))
    assert committed_tags(out / "checkpoints") == [f"step_00000000{i}" for i in (4, 3, 2, 1)]
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "run.lock").unlink()  # a copy is a new folder; the lock file would only name the finished run
    return out


def ckpt(run, step):
    return run / "checkpoints" / f"step_{step:09d}"


def test_a_file_the_manifest_does_not_list_is_refused_before_deepspeed_reads_it(inputs, run, tmp_path):
    import torch

    from beit_scale.checkpoint.tools import inspect

    marker, shard = tmp_path / "code_ran", ckpt(run, 4) / "mp_rank_00_model_states.pt"
    torch.save({"module": Planted(marker)}, shard)
    manifest = json.loads((ckpt(run, 4) / "manifest.json").read_text())
    del manifest["files"][shard.name]  # the manifest is not signed: an attacker can drop the entry
    (ckpt(run, 4) / "manifest.json").write_text(json.dumps(manifest))
    report = inspect(run)
    assert not report["complete"] and f"{shard}: not listed in the manifest" in report["problems"][0]
    proc = ok(launch(inputs, run, "train.total_steps=5", "--allow-config-change", "train.total_steps"))
    assert f"{shard}: not listed in the manifest (planted or left by another run)" in proc.stderr
    assert f"resumed from {ckpt(run, 3)} at step 3" in proc.stderr
    assert not marker.exists()


def test_a_new_run_on_a_used_folder_is_refused_unless_it_starts_over(inputs, run):
    before = sorted(p.name for p in run.iterdir())
    proc = launch(inputs, run, "checkpoint.resume=false", "optim.lr=1e-3")
    assert proc.returncode == 2
    assert "holds an earlier run's checkpoints (step_000000004); with checkpoint.resume=false" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    proc = ok(launch(inputs, run, "checkpoint.resume=false", "checkpoint.start_over=true", "optim.lr=1e-3",
                     "train.total_steps=2"))
    retired = [p for p in run.iterdir() if p.name.startswith("before-")]
    assert len(retired) == 1 and f"moved the earlier run's outputs to {retired[0]}" in proc.stderr
    assert committed_tags(retired[0] / "checkpoints")[0] == "step_000000004"  # the old run, intact, aside
    assert committed_tags(run / "checkpoints") == ["step_000000002", "step_000000001"]  # only the new run
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(subprocess.CalledProcessError):  # start_over needs resume=false
        subprocess.run(command(inputs, run, "checkpoint.start_over=true"), cwd=ROOT, env=rank_env(), check=True,
                       capture_output=True, timeout=RELAUNCH_TIMEOUT_S)


def test_pruning_after_a_fallback_drops_the_damaged_newer_checkpoint_not_the_good_one(inputs, run):
    for step in (4, 3):  # both newest damaged: the run falls back to step 2
        (ckpt(run, step) / "beit_rank00000.pt").write_bytes(b"damaged")
    killed = launch(inputs, run, "checkpoint.keep_last=1", env=rank_env(BEIT_SCALE_FAULT="before_files@4"))
    assert killed.returncode != 0 and f"resumed from {ckpt(run, 2)} at step 2" in killed.stderr
    assert "removed checkpoint step_000000004: newer than step 3" in killed.stderr
    assert committed_tags(run / "checkpoints") == ["step_000000003"]  # the good step 3 it saved, alone
    proc = ok(launch(inputs, run, "checkpoint.keep_last=1"))
    assert f"resumed from {ckpt(run, 3)} at step 3" in proc.stderr


def test_a_changed_config_is_refused_on_resume_unless_allowed(inputs, run):
    config_before = (run / "config.yaml").read_text()
    proc = launch(inputs, run, "optim.lr=1e-3", "train.total_steps=6", "masking.num_masked=20")
    assert proc.returncode == 2
    assert f"{ckpt(run, 4)} was saved with another config: masking.num_masked 26 -> 20; optim.lr 0.002 -> 0.001; " \
           "train.total_steps 4 -> 6" in proc.stderr
    assert "--allow-config-change masking.num_masked,optim.lr,train.total_steps" in proc.stderr
    assert (run / "config.yaml").read_text() == config_before  # not overwritten by the refused run
    proc = launch(inputs, run, "train.total_steps=6", "--allow-config-change", "train.total_steps")
    assert "resuming with train.total_steps changed from 4 to 6" in ok(proc).stderr
    assert "step 6/6 (100%)" in proc.stderr


def test_a_second_run_on_the_same_folder_is_kept_out_while_the_first_lives(inputs, tmp_path):
    first = subprocess.Popen(command(inputs, tmp_path / "busy", "train.total_steps=100000", "checkpoint.every_steps=0"),
                             cwd=ROOT, env=rank_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RELAUNCH_TIMEOUT_S
        while not (tmp_path / "busy" / "metrics.jsonl").is_file():  # training: it holds the folder
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.5)
        second = launch(inputs, tmp_path / "busy", "train.total_steps=100000", "checkpoint.every_steps=0")
        assert second.returncode == 2
        assert f"is in use by pid {first.pid} on " in second.stderr and "two runs on one folder" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # The holder is gone: its lock went with it, and the next run says whose folder it took.
    proc = ok(launch(inputs, tmp_path / "busy", "checkpoint.resume=false", "checkpoint.start_over=true",
                     "train.total_steps=2"))
    assert f"taken over from pid {first.pid} on " in proc.stderr


def test_lost_manifests_with_a_committed_pointer_never_restart_from_step_0(inputs, run):
    for step in (1, 2, 3, 4):
        (ckpt(run, step) / "manifest.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    proc = launch(inputs, run)
    assert proc.returncode == 3
    assert "latest_committed names 'step_000000004', which has no manifest now (deleted or damaged)" in proc.stderr
    assert "step 1/4" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == stamps  # nothing overwritten


@pytest.mark.parametrize("damage, reason", [
    (lambda m: m.write_bytes(m.read_bytes()[:20] + b"\xff" + m.read_bytes()[21:]), "is unreadable (UnicodeDecodeError"),
    (lambda m: m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "world_size"})),
     "lacks what a manifest holds"),
])
def test_an_unreadable_newest_manifest_is_damage_with_fallback(inputs, run, damage, reason):
    damage(ckpt(run, 4) / "manifest.json")
    proc = ok(launch(inputs, run))
    assert f"{ckpt(run, 4) / 'manifest.json'} {reason}" in proc.stderr
    assert f"resumed from {ckpt(run, 3)} at step 3" in proc.stderr


def test_stray_folders_beside_the_checkpoints_are_ignored_with_a_warning(inputs, run):
    from beit_scale.checkpoint.tools import inspect

    shutil.copytree(ckpt(run, 4), run / "checkpoints" / "step_000000004.bak")  # a user's backup, manifest and all
    backup = {p.name: sha256(p) for p in (run / "checkpoints" / "step_000000004.bak").iterdir()}
    (run / "checkpoints" / "step_old").mkdir()
    (run / "checkpoints" / "step_000000009.bak").write_text("x")
    assert inspect(run)["complete"]
    proc = ok(launch(inputs, run, "train.total_steps=6", "checkpoint.keep_last=1", "--allow-config-change",
                     "train.total_steps"))
    assert "ignoring ['step_000000004.bak', 'step_000000009.bak', 'step_old']" in proc.stderr
    assert f"resumed from {ckpt(run, 4)} at step 4" in proc.stderr
    assert committed_tags(run / "checkpoints") == ["step_000000006"]
    assert {"step_000000004.bak", "step_old", "step_000000009.bak"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert {p.name: sha256(p) for p in (run / "checkpoints" / "step_000000004.bak").iterdir()} == backup  # untouched


def test_non_finite_weights_are_never_committed(inputs, tmp_path):
    proc = launch(inputs, tmp_path / "run", env=rank_env(BEIT_SCALE_FAULT="nan_weights@2"))
    assert proc.returncode == 3
    assert (f"the weights after step 2 are not finite; no checkpoint of them is written. The last committed "
            f"checkpoint is {ckpt(tmp_path / 'run', 1)}") in proc.stderr
    assert committed_tags(tmp_path / "run" / "checkpoints") == ["step_000000001"]


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB file system: room for one checkpoint of the tiny run (7.3 MB) and its logs, not two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(disk)], check=True, timeout=30)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True, timeout=30)


def test_a_full_disk_during_a_save_is_a_message_and_keeps_the_last_checkpoint(inputs, small_disk):
    out = small_disk / "run"
    proc = launch(inputs, out, "checkpoint.keep_last=1")
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert f"the file system of {out / 'checkpoints'} is full while writing step_000000002 (" in proc.stderr
    assert "a checkpoint of this run takes about 7" in proc.stderr and "Traceback" not in proc.stderr
    assert committed_tags(out / "checkpoints") == ["step_000000001"]
    assert not ckpt(out, 2).exists()  # its partial files are gone, the space given back
