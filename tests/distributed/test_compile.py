"""engine.compile: the compiled engine (torch.compile through DeepSpeed's engine.compile, inductor on the CPU)
trains exactly as the eager one: same losses and gradient norms at every step. The tokenizer's labeller is
compiled with it, so the same losses also prove the same labels."""
import json
import sys

import pytest

from tests.distributed.ranks import rank_env, run_ranks
from tests.distributed.test_launchers import TINY

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def logged(out) -> dict[int, dict]:
    return {rec["step"]: rec for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_the_compiled_engine_gives_the_eager_losses(inputs, tmp_path):
    data, tok = inputs
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        proc = run_ranks([sys.executable, "-m", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain",
                          f"run.output_dir={out}", f"data.root={data}", f"tokenizer.path={tok}", *TINY,
                          "train.global_batch=8", "train.total_steps=3", "train.log_every=1", "model.drop_path=0.1",
                          "data.num_workers=0", f"engine.compile={str(compiled).lower()}"],
                         timeout=240, env=rank_env())
        assert ("the model is compiled with torch.compile" in proc.stderr) == compiled
        assert ("the tokenizer labels in fp32, compiled" in proc.stderr) == compiled  # so equal losses: equal labels
        runs[compiled] = logged(out)
    assert sorted(runs[True]) == [1, 2, 3]
    for step, eager in runs[False].items():
        for key in ("loss", "mask_acc", "grad_norm", "lr"):
            assert runs[True][step][key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), (step, key)
