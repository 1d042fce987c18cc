"""Checkpoint folder parts without a process group: tags, manifests, strangers, the run lock, config changes."""
import json
import logging
import os
import subprocess
import sys

import pytest

from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.files import (ManifestError, committed_tags, is_tag, read_manifest, step_of, strangers,
                                         tag_of)
from beit_scale.checkpoint.lock import lock_run_folder
from beit_scale.config import SAFE_ON_RESUME, changed_fields, load_config, to_dict
from tests.distributed.ranks import ROOT


def test_only_the_names_tag_of_writes_are_checkpoint_tags(tmp_path):
    assert is_tag(tag_of(12)) and step_of(tag_of(12)) == 12
    for name in ("step_000000004.bak", "step_old", "step_12", "step_0000000001", "xstep_000000001"):
        assert not is_tag(name)
        with pytest.raises(ValueError, match="is not a checkpoint folder name"):
            step_of(name)
    layout = RunLayout(tmp_path)
    for name in (tag_of(3), tag_of(5), "step_000000005.bak", "step_old"):
        (layout.checkpoints / name).mkdir(parents=True)
        (layout.checkpoints / name / "manifest.json").write_text("{}")
    (layout.checkpoints / tag_of(7)).mkdir()  # incomplete: no manifest
    layout.latest.write_text(tag_of(5))
    (layout.universal / "x").mkdir(parents=True)
    assert committed_tags(layout.checkpoints) == [tag_of(5), tag_of(3)]
    assert strangers(layout) == ["step_000000005.bak", "step_old"]


@pytest.mark.parametrize("content, reason", [
    (b'{"world_size": 1, "files": {}\xff}', "is unreadable (UnicodeDecodeError"),
    (b'{"world_size": 1, "files": {', "is unreadable (JSONDecodeError"),
    (b'{"files": {}}', "lacks what a manifest holds"),
    (b'{"world_size": 0, "files": {}}', "lacks what a manifest holds"),
    (b'{"world_size": 2, "files": {"a.pt": {"size": "9"}}}', "lacks what a manifest holds"),
    (b'[1, 2]', "lacks what a manifest holds"),
])
def test_an_unreadable_manifest_is_damage_naming_the_file(tmp_path, content, reason):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ManifestError, match=f"{tmp_path / 'manifest.json'} {reason}".replace("(", r"\(")):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path / "none") is None  # absent: an unfinished save, not damage


HOLDER = """
import sys, time
from pathlib import Path
from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.lock import lock_run_folder
assert lock_run_folder(RunLayout(Path(sys.argv[1]))) is None
print("locked", flush=True)
time.sleep(600)
"""


def test_the_run_lock_keeps_a_second_process_out_and_dies_with_its_holder(tmp_path, caplog):
    layout = RunLayout(tmp_path / "run").make()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(layout.root)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        refusal = lock_run_folder(layout)
        assert refusal and f"is in use by pid {holder.pid} on " in refusal and "another run.output_dir" in refusal
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with caplog.at_level(logging.INFO):
        assert lock_run_folder(layout) is None  # the kernel dropped the dead holder's lock
    assert f"taken over from pid {holder.pid} on " in caplog.text
    assert json.loads(layout.lock.read_text())["pid"] == os.getpid()
    assert lock_run_folder(layout) is None  # again in the same process: still ours


def test_config_changes_name_each_field_except_the_safe_ones():
    saved = to_dict(load_config("quickstart_pretrain"))
    cfg = load_config("quickstart_pretrain", ["optim.lr=1e-3", "train.log_every=7", "data.root=/elsewhere",
                                              "train.micro_batch=8", "checkpoint.keep_last=9"])
    assert changed_fields(saved, cfg) == [("data.root", "", "/elsewhere"), ("optim.lr", 0.002, 0.001)]
    del saved["optim"]["lr"]  # a field an older version did not save is not compared
    assert [name for name, _, _ in changed_fields(saved, cfg)] == ["data.root"]
    names = {f"{section}.{key}" for section, fields in to_dict(cfg).items() for key in fields}
    assert SAFE_ON_RESUME <= names, SAFE_ON_RESUME - names  # no typo keeps a field unprotected
