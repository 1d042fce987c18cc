"""Run by torchrun in tests: segmentation steps with layer-wise lr decay under DeepSpeed against plain PyTorch.

Usage: torchrun --nproc_per_node=2 segment_step_worker.py OUT_JSON STAGE [STAGE ...]
As finetune_step_worker.py does for the classifier: for each ZeRO stage, every rank trains a tiny BeitSegmenter for
a few optimizer steps through the real pieces (layer_decay_param_groups on the model's own layer ids, build_engine
with those groups, the poly schedule, clipping, gradient accumulation, segmentation_loss) in fp32; rank 0 replays
the same global batches with torch.optim.AdamW on the same groups and reports each group's learning rate and
parameter names per step, the losses and the largest parameter difference. BatchNorm normalises each micro batch
alone in both, so the losses and gradients match; its running statistics are not compared.
"""
import json
import sys

import torch

from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.config import load_config
from beit_scale.engine.core import StepSchedule, build_engine, build_optimizer
from beit_scale.engine.dist import init_distributed
from beit_scale.engine.ds_config import build_ds_config
from beit_scale.engine.layer_decay import layer_decay_param_groups, param_names_per_group
from beit_scale.models import get_spec
from beit_scale.models.segmentation import BeitSegmenter, segmentation_loss
from tests.distributed.finetune_step_worker import group_view, replay

STEPS, ACCUM, MICRO, CLASSES, PX = 3, 2, 4, 11, 32


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    labels = torch.randint(0, CLASSES, (MICRO, PX, PX), generator=g)
    labels[:, :4] = 255  # a band of ignored pixels, as padding gives
    return torch.randn(MICRO, 3, PX, PX, generator=g), labels


def config(stage: int, world: int):
    return load_config(None, [
        "run.job=segment", "model.name=beit_tiny_patch4_32", "model.drop_path=0.0", f"engine.zero_stage={stage}",
        "engine.precision=fp32", "engine.ds_config=ds_configs/tiny.json",
        f"train.micro_batch={MICRO}", f"train.grad_accum={ACCUM}", f"train.global_batch={MICRO * ACCUM * world}",
        f"train.total_steps={STEPS}", "optim.schedule=poly", "optim.warmup_steps=1", "optim.lr=2e-3",
        "optim.min_lr=0.0", "optim.weight_decay=0.05", "optim.clip_grad=0.5", "segment.layer_decay=0.9",
        f"segment.num_classes={CLASSES}", f"segment.crop_px={PX}",
    ])


def fresh_model(cfg) -> BeitSegmenter:
    torch.manual_seed(0)
    s = cfg.segment
    return BeitSegmenter(get_spec(cfg.model.name), s.num_classes, s.crop_px, drop_path=0.0, channels=16,
                         aux_channels=16, dropout=0.0)


def groups_of(cfg, model):
    return layer_decay_param_groups(model, cfg.optim.weight_decay, cfg.segment.layer_decay)


def loss_of(model, images, labels, cfg) -> torch.Tensor:
    return segmentation_loss(model(images), labels, cfg.segment.aux_weight)["loss"]


def train_engine(cfg, info):
    model = fresh_model(cfg)
    groups = groups_of(cfg, model)
    names = param_names_per_group(model, groups)
    engine, schedule = build_engine(model, cfg.optim, build_ds_config(cfg, info.world_size), STEPS, groups)
    losses, seen = [], []
    for step in range(STEPS):
        schedule.apply(step)
        seen.append(group_view(engine.optimizer))
        step_loss = 0.0
        for micro in range(ACCUM):
            images, labels = batch(info.rank, step, micro)
            loss = loss_of(engine, images, labels, cfg)
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / ACCUM
        assert engine.was_step_applied()
        t = torch.tensor(step_loss)
        torch.distributed.all_reduce(t)
        losses.append(t.item() / info.world_size)
    params = {n for n, _ in engine.module.named_parameters()}
    state = {k: v for k, v in full_state_dict(engine).items() if k in params}
    return state, losses, seen, names, engine.zero_optimization_stage()


def train_reference(cfg, world: int):
    model = fresh_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, groups_of(cfg, model))
    losses, seen = replay(model, optimizer, StepSchedule(optimizer, cfg.optim, STEPS), world, batch,
                          lambda m, images, labels: loss_of(m, images, labels, cfg), cfg.optim.clip_grad, STEPS, ACCUM)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, seen


def main():
    out, stages = sys.argv[1], [int(s) for s in sys.argv[2:]]
    info = init_distributed()
    report = {}
    for stage in stages:
        cfg = config(stage, info.world_size)
        state, losses, groups, names, used_stage = train_engine(cfg, info)
        if info.rank == 0:
            ref_state, ref_losses, ref_groups = train_reference(cfg, info.world_size)
            initial = dict(fresh_model(cfg).named_parameters())
            diffs = {k: (state[k] - ref_state[k]).abs().max().item() for k in ref_state}
            moved = {k: (ref_state[k] - initial[k]).abs().max().item() for k in ref_state}
            report[stage] = {"stage": used_stage, "losses": losses, "ref_losses": ref_losses, "groups": groups,
                             "ref_groups": ref_groups, "names": names, "max_weight_diff": max(diffs.values()),
                             "worst_tensor": max(diffs, key=diffs.get), "weight_change": moved, "diffs": diffs,
                             "num_blocks": len(fresh_model(cfg).blocks)}
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
