"""fp16 with DeepSpeed's dynamic loss scaling on 2 ranks: an overflow on one rank skips the step on every rank and
halves the scale, and the run trains on (V100 clusters, the paper's hardware)."""
import json
import re
import subprocess

import pytest

from tests.distributed.ranks import rank_env, torchrun
from tests.distributed.test_launchers import TINY

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


@pytest.mark.parametrize("stage", [0, 1])
def test_an_fp16_overflow_skips_the_step_everywhere_and_halves_the_loss_scale(inputs, tmp_path, stage):
    data, tok = inputs
    ds_config = tmp_path / "fp16.json"  # hysteresis 1: every overflow halves the scale (DeepSpeed's default: 2)
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": stage}, "fp16": {"enabled": True, "hysteresis": 1}}))
    proc = subprocess.run(torchrun(2, "-m", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain",
                                   f"run.output_dir={tmp_path / 'run'}", f"data.root={data}", f"tokenizer.path={tok}",
                                   *TINY, f"engine.ds_config={ds_config}", "train.log_every=1", "data.num_workers=0",
                                   "tokenizer.precision=fp16"),
                          env=rank_env(BEIT_SCALE_FAULT="nan_loss@5:1"), capture_output=True, text=True, timeout=240,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        records[json.loads(line)["step"]] = json.loads(line)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert records[5]["loss_scale"] == records[4]["loss_scale"] / 2  # the NaN at step 5 halved it; the retry ran
    for rank in (0, 1):
        assert (f"[rank {rank}] WARNING beit_scale.train.driver: non-finite loss or gradient at step 5 (fp16 overflow; "
                f"loss scale now {records[5]['loss_scale']:g}): skipped on every rank") in proc.stderr
    # The labels in fp16 too (the V100 set-up): measured against fp32 once per rank, overflows counted per log.
    assert "the tokenizer labels in fp16 autocast (its bottom stage in fp32)" in proc.stderr
    assert re.search(r"\[rank 0\] (INFO|WARNING) beit_scale.train.pretrain: tokenizer.precision=fp16 labels agree "
                     r"with fp32 on \d+\.\d\d% of the first batch's 512 positions", proc.stderr)
    assert all(rec["tokenizer_nonfinite"] == 0 for rec in records.values())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_steps"] >= 1 and summary["steps"] == 6 and summary["final_loss"] < records[1]["loss"]
    config = json.loads((tmp_path / "run" / "ds_config.json").read_text())
    assert config["fp16"]["loss_scale"] == 0 and config["data_types"]["buffer_dtype"] == "fp16"
