"""Host syncs per optimizer step of real pretraining on 2 ranks: at most one (the skip decision) at the default
engine settings, counted by instrumenting Tensor.item, __bool__ and tolist (tests/distributed/syncs_worker.py)."""
import json

import pytest

from tests.distributed.ranks import ROOT, run_ranks, torchrun

pytestmark = pytest.mark.distributed


def test_at_most_one_host_sync_per_step_at_every_zero_stage(inputs, tmp_path):
    data, tok = inputs
    out = tmp_path / "syncs.json"
    run_ranks(torchrun(2, str(ROOT / "tests/distributed/syncs_worker.py"), str(out), str(data), str(tok),
                       str(tmp_path / "runs")), timeout=300)
    counts = json.loads(out.read_text())
    assert set(counts) == {"bf16_zero1_base", "bf16_zero2", "fp32_zero1", "fp32_zero0", "bf16_zero3"}
    # ZeRO 0-2: 3-4 before (deepspeed-perf.md). ZeRO-3 (leaf blocks): DeepSpeed's parameter coordinator syncs
    # hundreds of times while it records its fetch order in the first step, which is not counted; not after.
    for setup, per_step in counts.items():
        assert len(per_step) == 4 and max(per_step) <= 1, (setup, per_step)
