"""Count host syncs (Tensor.item, __bool__, tolist) per optimizer step of real pretraining through the driver.

Usage: torchrun --nproc_per_node=2 syncs_worker.py OUT_JSON DATA TOKENIZER RUN_ROOT

For each set-up, steps 2..5 of a 6-step run are counted from their first micro batch to the end of their
end_step (checkpoint and preemption agreement included); data loading (the sampler's index lists) and the
first step (warm-up) and the last (logging, final checkpoint) are left out. Rank 0 writes
{set-up: [count of step 2, ..., count of step 5]}; every rank asserts it counted the same.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from beit_scale.config import load_config
from beit_scale.train import driver
from beit_scale.train.pretrain import Pretrain
from beit_scale.train.state import BatchStream

SETUPS = {  # the base recipe's engine (ds_configs/base.json: bf16 ZeRO-1, overlapped buckets), then others
    "bf16_zero1_base": ["engine.ds_config=ds_configs/base.json"],
    "bf16_zero2": ["engine.ds_config=ds_configs/base.json", "engine.zero_stage=2"],
    "fp32_zero1": ["engine.ds_config=ds_configs/tiny.json"],
    "fp32_zero0": ["engine.ds_config=ds_configs/tiny.json", "engine.zero_stage=0"],
    # ZeRO-3 with tiny.json's leaf blocks and limits sized in blocks (engine/plan.py), as giant_zero3.json
    "bf16_zero3": ["engine.ds_config=ds_configs/tiny.json", "engine.zero_stage=3", "engine.precision=bf16"],
}
counting, count = [False], [0]


def counted(name):
    original = getattr(torch.Tensor, name)

    def call(self, *args, **kwargs):
        if counting[0]:
            count[0] += 1
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, call)


def main(out_json: str, data: str, tok: str, run_root: str) -> None:
    for name in ("item", "__bool__", "tolist"):
        counted(name)
    per_step: list[int] = []
    end_step, next_batch = driver.Loop.end_step, BatchStream.__next__

    def end_step_counted(self, engine, payload):
        end_step(self, engine, payload)
        per_step.append(count[0])
        count[0] = 0

    def next_batch_uncounted(self):
        was, counting[0] = counting[0], False
        try:
            return next_batch(self)
        finally:
            counting[0] = was

    driver.Loop.end_step, BatchStream.__next__ = end_step_counted, next_batch_uncounted
    results = {}
    for setup, overrides in SETUPS.items():
        cfg = load_config("quickstart_pretrain", [
            f"run.output_dir={run_root}/{setup}", f"data.root={data}", f"tokenizer.path={tok}",
            "model.name=beit_tiny_patch4_32", "data.num_workers=1", "train.micro_batch=4", "train.grad_accum=2",
            "train.global_batch=16", "train.total_steps=6", "train.log_every=6", "checkpoint.every_steps=0",
            "optim.warmup_steps=1", *overrides])
        per_step.clear()
        counting[0] = True
        driver.drive(cfg, Pretrain())
        counting[0] = False
        results[setup] = per_step[1:5]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    assert all(g == results for g in gathered), gathered
    if dist.get_rank() == 0:
        Path(out_json).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
