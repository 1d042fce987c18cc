"""Run by torchrun in tests: fine-tuning steps with layer-wise lr decay under DeepSpeed against plain PyTorch.

Usage: torchrun --nproc_per_node=2 finetune_step_worker.py OUT_JSON STAGE [STAGE ...]
For each ZeRO stage, every rank trains the tiny classifier for a few optimizer steps through the real pieces
(layer_decay_param_groups, build_engine with those groups, the timm schedule, clipping, gradient accumulation,
finetune_step) in fp32. Rank 0 replays the same global batches with torch.optim.AdamW on the same groups and
reports each group's learning rate per step, the losses and the largest weight difference.
"""
import json
import sys
from functools import partial

import torch
import torch.nn.functional as F

from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.config import load_config
from beit_scale.engine.core import StepSchedule, build_engine, build_optimizer
from beit_scale.engine.dist import init_distributed
from beit_scale.engine.ds_config import build_ds_config
from beit_scale.engine.layer_decay import layer_decay_param_groups
from beit_scale.models import build_classifier, get_spec
from beit_scale.train.finetune import finetune_step

STEPS, ACCUM, MICRO, CLASSES = 3, 2, 3, 10


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(MICRO, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (MICRO,), generator=g)


def config(stage: int, world: int):
    return load_config(None, [
        "model.name=beit_tiny_patch4_32", "model.drop_path=0.0", f"engine.zero_stage={stage}",
        "engine.precision=fp32", "engine.ds_config=ds_configs/tiny.json",
        f"train.micro_batch={MICRO}", f"train.grad_accum={ACCUM}", f"train.global_batch={MICRO * ACCUM * world}",
        f"train.total_steps={STEPS}", "optim.warmup_steps=1", "optim.lr=2e-3", "optim.min_lr=1e-4",
        "optim.weight_decay=0.05", "optim.clip_grad=0.5", "finetune.layer_decay=0.65", "finetune.label_smoothing=0.1",
    ])


def fresh_model(cfg):
    torch.manual_seed(0)
    return build_classifier(get_spec(cfg.model.name), CLASSES, drop_path=0.0)


def groups_of(cfg, model):
    return layer_decay_param_groups(model, cfg.optim.weight_decay, cfg.finetune.layer_decay)


def group_view(optimizer) -> list[dict]:
    return [{"layer_id": g.get("layer_id"), "lr_scale": g.get("lr_scale"), "lr": g["lr"],
             "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]


def train_engine(cfg, info):
    model = fresh_model(cfg)
    engine, schedule = build_engine(model, cfg.optim, build_ds_config(cfg, info.world_size), STEPS,
                                    groups_of(cfg, model))
    criterion = partial(F.cross_entropy, label_smoothing=cfg.finetune.label_smoothing)
    losses, groups = [], []
    for step in range(STEPS):
        schedule.apply(step)
        groups.append(group_view(engine.optimizer))
        step_loss = 0.0
        for micro in range(ACCUM):
            images, labels = batch(info.rank, step, micro)
            loss, applied = finetune_step(engine, images, labels, criterion)
            step_loss += loss.item() / ACCUM
        assert applied
        t = torch.tensor(step_loss)
        torch.distributed.all_reduce(t)
        losses.append(t.item() / info.world_size)
    return full_state_dict(engine), losses, groups, engine.zero_optimization_stage()


def replay(model, optimizer, schedule, world: int, batch_of, loss_of, clip: float, steps: int = STEPS,
           accum: int = ACCUM) -> tuple[list[float], list]:
    """Plain PyTorch over the global batches the ranks trained on: for each of ``steps`` steps, every rank's
    ``accum`` micro batches (``batch_of(rank, step, micro)``), the mean loss (``loss_of(model, *batch)``),
    clipping, step.
    Returns the losses and each step's `group_view`."""
    losses, groups = [], []
    for step in range(steps):
        schedule.apply(step)
        groups.append(group_view(optimizer))
        optimizer.zero_grad()
        total = 0.0
        for rank in range(world):
            for micro in range(accum):
                loss = loss_of(model, *batch_of(rank, step, micro))
                (loss / (world * accum)).backward()
                total += loss.item() / (world * accum)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(total)
    return losses, groups


def train_reference(cfg, world: int):
    model = fresh_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, groups_of(cfg, model))
    losses, groups = replay(model, optimizer, StepSchedule(optimizer, cfg.optim, STEPS), world, batch,
                            lambda m, images, labels: F.cross_entropy(m(images), labels,
                                                                      label_smoothing=cfg.finetune.label_smoothing),
                            cfg.optim.clip_grad)
    return {k: v.detach() for k, v in model.state_dict().items()}, losses, groups


def main():
    out, stages = sys.argv[1], [int(s) for s in sys.argv[2:]]
    info = init_distributed()
    report = {}
    for stage in stages:
        cfg = config(stage, info.world_size)
        state, losses, groups, used_stage = train_engine(cfg, info)
        if info.rank == 0:
            ref_state, ref_losses, ref_groups = train_reference(cfg, info.world_size)
            initial = fresh_model(cfg).state_dict()
            diffs = {k: (state[k] - ref_state[k]).abs().max().item() for k in ref_state}
            moved = {k: (ref_state[k] - initial[k]).abs().max().item() for k in ref_state}
            report[stage] = {"stage": used_stage, "losses": losses, "ref_losses": ref_losses, "groups": groups,
                             "ref_groups": ref_groups, "max_weight_diff": max(diffs.values()),
                             "worst_tensor": max(diffs, key=diffs.get), "weight_change": moved,
                             "num_blocks": len(fresh_model(cfg).blocks)}
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
