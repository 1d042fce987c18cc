"""Run by torchrun in tests: a DeepSpeed pretraining step against a plain-PyTorch reference step.

Usage: torchrun --nproc_per_node=2 engine_step_worker.py STAGE OUT_JSON
Each rank trains the tiny MIM model for a few optimizer steps through the real pieces (ds_config merge,
client AdamW with decay groups, timm schedule, clipping, gradient accumulation, pretrain_step) in fp32, then
in bf16. Rank 0 replays the same global batches in plain PyTorch and reports the differences.
"""
import json
import sys

import torch
import torch.nn.functional as F

from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.config import load_config
from beit_scale.engine.core import StepSchedule, build_engine, build_optimizer, engine_dtype
from beit_scale.engine.dist import init_distributed
from beit_scale.engine.ds_config import build_ds_config
from beit_scale.engine.syncs import fused_global_norm
from beit_scale.models import build_mim_model
from beit_scale.tokenizers import DiscreteVAE, DVAEArch
from beit_scale.train.pretrain import pretrain_step

STEPS, ACCUM, MICRO, VOCAB = 4, 2, 3, 32


def batch(rank: int, step: int, micro: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    mask = torch.zeros(MICRO, 64, dtype=torch.bool)
    for i in range(MICRO):
        mask[i, torch.randperm(64, generator=g)[:26]] = True
    return {"image": torch.randn(MICRO, 3, 32, 32, generator=g),
            "tokenizer_view": torch.rand(MICRO, 3, 16, 16, generator=g), "mask": mask}


def config(stage: int, precision: str, world: int):
    return load_config(None, [
        "model.name=beit_tiny_patch4_32", "model.drop_path=0.0", f"engine.zero_stage={stage}",
        f"engine.precision={precision}", "engine.ds_config=ds_configs/tiny.json",
        f"train.micro_batch={MICRO}", f"train.grad_accum={ACCUM}", f"train.global_batch={MICRO * ACCUM * world}",
        f"train.total_steps={STEPS}", "optim.warmup_steps=1", "optim.lr=2e-3", "optim.min_lr=1e-4",
        "optim.clip_grad=0.05",  # small enough that every step clips: clipping must really be applied
    ])


def fresh_model(cfg):
    torch.manual_seed(0)
    return build_mim_model(cfg.model, VOCAB)


def train_engine(cfg, info, tokenizer):
    engine, schedule = build_engine(fresh_model(cfg), cfg.optim, build_ds_config(cfg, info.world_size), STEPS)
    dtype, losses, lrs, norms = engine_dtype(engine), [], [], []
    for step in range(STEPS):
        schedule.apply(step)
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
        step_loss = 0.0
        for micro in range(ACCUM):
            result = pretrain_step(engine, tokenizer, batch(info.rank, step, micro), info.device, dtype)
            step_loss += result.loss.item() / ACCUM
        t = torch.tensor(step_loss)
        torch.distributed.all_reduce(t)
        losses.append(t.item() / info.world_size)
        norm = engine.get_global_grad_norm()  # None at ZeRO-0 in fp32: DeepSpeed clips without keeping it
        norms.append(None if norm is None else float(norm))
    param_dtype = str(next(engine.module.parameters()).dtype)
    leaves = [bool(getattr(block, "_z3_leaf", False)) for block in engine.module.blocks]  # ds_configs/tiny.json
    fused = getattr(getattr(engine.optimizer, "scaled_global_norm", None), "__func__", None) is fused_global_norm
    return full_state_dict(engine), losses, (lrs, norms), (engine.zero_optimization_stage(), param_dtype, all(leaves),
                                                          fused)


def train_reference(cfg, world: int, tokenizer):
    model = fresh_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = StepSchedule(optimizer, cfg.optim, STEPS)
    losses, lrs, norms = [], [], []
    for step in range(STEPS):
        schedule.apply(step)
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.zero_grad()
        total = 0.0
        for rank in range(world):
            for micro in range(ACCUM):
                b = batch(rank, step, micro)
                targets = tokenizer.encode(b["tokenizer_view"])[b["mask"]]
                loss = F.cross_entropy(model(b["image"], b["mask"]), targets) / (world * ACCUM)
                loss.backward()
                total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)))
        optimizer.step()
        losses.append(total)
    return {k: v.detach() for k, v in model.state_dict().items()}, losses, (lrs, norms)


def main():
    stage, out = int(sys.argv[1]), sys.argv[2]
    info = init_distributed()
    torch.manual_seed(1)
    tokenizer = DiscreteVAE(DVAEArch(vocab_size=VOCAB, input_size=16, downsample=2, hidden_dim=8,
                                     codebook_dim=8, num_res_blocks=1)).eval()
    result = {}
    for precision in ("fp32", "bf16"):
        cfg = config(stage, precision, info.world_size)
        state, losses, (lrs, norms), (used_stage, dtype, leaves, fused) = train_engine(cfg, info, tokenizer)
        result[precision] = {"losses": losses, "lrs": lrs, "grad_norms": norms, "stage": used_stage, "dtype": dtype,
                             "state": state, "leaf_blocks": leaves, "fused_norm": fused}
    if info.rank == 0:
        ref_state, ref_losses, (ref_lrs, ref_norms) = train_reference(config(stage, "fp32", info.world_size),
                                                                      info.world_size, tokenizer)
        report = {"ref_losses": ref_losses, "ref_lrs": ref_lrs, "ref_grad_norms": ref_norms}
        for precision, r in result.items():
            diffs = {k: (r["state"][k] - ref_state[k]).abs().max().item() for k in ref_state}
            report[precision] = {"losses": r["losses"], "lrs": r["lrs"], "stage": r["stage"], "dtype": r["dtype"],
                                 "grad_norms": r["grad_norms"], "fused_norm": r["fused_norm"],
                                 "leaf_blocks": r["leaf_blocks"],
                                 "max_weight_diff": max(diffs.values()),
                                 "max_weight_change": max((ref_state[k] - v).abs().max().item()
                                                          for k, v in fresh_model(cfg).state_dict().items()),
                                 "worst_tensor": max(diffs, key=diffs.get)}
        with open(out, "w") as f:
            json.dump(report, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
