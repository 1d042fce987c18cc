"""Linear probing: a linear classifier on frozen BEiT features (arXiv 2106.08254, appendix).

Features are the average-pooled patch tokens after ``finetune.probe_block`` blocks, normalised without affine
parameters (BatchNorm as in MAE's probe, or LayerNorm), then one linear layer. Only the head trains. The
released BEiT script instead concatenates [CLS] and the mean patch token of every block and trains one head per
block (AdamW, lr 4e-3, weight decay 1e-4, 100 epochs, batch 1024): sweep ``probe_block`` to do the same.

It runs on the same DeepSpeed engine as the other jobs, any ZeRO stage: the backbone's parameters are frozen
(no optimizer state, no gradients). BatchNorm statistics are per rank during training, as without SyncBatchNorm;
its running statistics are averaged over ranks before every evaluation and before saving, so all ranks
evaluate the same classifier.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

from beit_scale.checkpoint import RunLayout, faults
from beit_scale.checkpoint.export import PROBE_FORMAT
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.weights import save_weights
from beit_scale.checks import patch_grid
from beit_scale.config import Config
from beit_scale.engine.core import guarded_step
from beit_scale.engine.dist import init_distributed
from beit_scale.models import build_classifier, get_spec
from beit_scale.train.common import (make_loader, seed_everything, skip_nonfinite_step,
                                    start_engine, start_loop)
from beit_scale.train.finetune import (ClassificationSet, evaluate, load_initial_weights, log_eval, train_images,
                                       train_transform, val_loader)

log = logging.getLogger(__name__)


class LinearProbe(nn.Module):
    """Frozen BEiT blocks ``[0, num_blocks)`` -> mean of the patch tokens -> norm without affine -> linear head."""

    def __init__(self, backbone: Beit, num_blocks: int, num_classes: int, norm: str = "batchnorm"):
        super().__init__()
        backbone.blocks = backbone.blocks[:num_blocks]  # later blocks are never run
        backbone.fc_norm, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone.requires_grad_(False).eval()
        dim = backbone.embed_dim
        self.norm = (nn.BatchNorm1d(dim, affine=False, eps=1e-6) if norm == "batchnorm"
                     else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()  # no drop path, ever
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) mean of the patch tokens after the kept blocks."""
        b = self.backbone
        x = b.patch_embed(images)  # (B, N, D)
        x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)  # (B, 1+N, D)
        if b.pos_embed is not None:
            x = x + b.pos_embed
        shared = b.rel_pos_bias() if b.rel_pos_bias is not None else None
        for blk in b.blocks:
            x = blk(x, shared_rel_pos_bias=shared)
        return x[:, 1:].mean(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(images)))  # (B, num_classes)


def average_norm_stats(probe: nn.Module) -> None:
    """Average the BatchNorm running statistics over ranks (buffers are never partitioned, even at ZeRO-3)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buf in probe.norm.buffers():
        if buf.is_floating_point():
            total = buf.detach().float()
            dist.all_reduce(total)
            buf.copy_(total / dist.get_world_size())


def run(cfg: Config) -> dict:
    """Train a linear probe per ``cfg``; returns the summary that rank 0 also writes to ``summary.json``."""
    info = init_distributed()
    seed_everything(cfg.run.seed)
    f, d = cfg.finetune, cfg.data
    _, img_size = patch_grid(cfg)
    spec = get_spec(cfg.model.name)
    layout = RunLayout(Path(cfg.run.output_dir)).make()

    base, indices, num_classes = train_images(cfg)
    backbone = build_classifier(spec, 0, img_size, drop_path=0.0, layer_scale=cfg.model.layer_scale)
    source = load_initial_weights(backbone, cfg, layout, info.rank)
    num_blocks = f.probe_block or spec.depth
    probe = LinearProbe(backbone, num_blocks, num_classes, f.probe_norm)
    layout, engine, schedule, dtype = start_engine(cfg, probe, info)
    log.info("linear probe of %s after block %d/%d (%s), %d classes, %d of %d images, %d rank(s), %s, ZeRO %d",
             cfg.model.name, num_blocks, spec.depth, f.probe_norm, num_classes, len(indices), len(base),
             info.world_size, dtype, engine.zero_optimization_stage())

    train_set = ClassificationSet(base, indices, train_transform(cfg, img_size, augment=False), cfg.run.seed)
    loader = make_loader(train_set, cfg.train.micro_batch, d.num_workers, cfg.run.seed, train=True)
    val = val_loader(cfg, img_size, info)
    loop = start_loop(cfg, layout, info, engine, loader)
    state, batches, writer, meter, trace = (loop.state, loop.batches, loop.writer, loop.meter,
                                            loop.trace)
    metrics_file = meter.metrics_file

    def run_eval(step: int) -> dict[str, float]:
        average_norm_stats(engine.module)
        engine.eval()
        results = evaluate(engine, val, info.device, dtype)
        engine.train()
        log_eval(results, step, writer, metrics_file)
        return results

    last, results = {"loss": float("nan")}, {}
    engine.train()
    while state.step < cfg.train.total_steps:
        step = state.step
        schedule.apply(step)
        seen, applied = [], True
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            trace.add(step + 1, batch["index"])
            labels = batch["label"].to(info.device, non_blocking=True)
            logits = engine(batch["image"].to(info.device, dtype, non_blocking=True))
            loss = faults.poison(F.cross_entropy(logits.float(), labels, label_smoothing=f.label_smoothing),
                                 step + 1, info.rank)
            engine.backward(loss)
            applied = guarded_step(engine)
            seen.append((loss.detach(), (logits.argmax(-1) == labels).float().mean()))
        if not applied:  # DeepSpeed decides at the boundary, the same on every rank
            skip_nonfinite_step(state, cfg, layout)
            continue
        for loss, top1 in seen:
            meter.add(loss=loss, train_top1=top1)
        state.consecutive_skips = 0
        state.step = step + 1
        meter.step_done()
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.total_steps:
            last = meter.flush(step, lr=engine.optimizer.param_groups[0]["lr"])
        if val is not None and f.eval_every and state.step % f.eval_every == 0 and state.step < cfg.train.total_steps:
            run_eval(state.step)
        loop.end_step(engine)

    if val is not None:
        results = run_eval(cfg.train.total_steps)
    else:
        average_norm_stats(engine.module)
        log.warning("no data.val_root: no top-1 evaluation")
    weights = full_state_dict(engine)  # collective under ZeRO-3
    summary = {**results, "final_loss": last["loss"], "train_top1": last.get("train_top1", float("nan")),
               "probe_block": num_blocks, "probe_norm": f.probe_norm, "steps": cfg.train.total_steps,
               "num_classes": num_classes, "train_images": len(indices), "lineage": cfg.run.name,
               "init_from": str(source.path) if source else "", "world_size": info.world_size,
               "restarts": state.restarts, "skipped_steps": state.skipped_steps}
    if info.rank == 0:
        head = {k: v for k, v in weights.items() if k.startswith(("norm.", "head."))}  # the backbone is init_from's
        save_weights(head, layout.model, {"format": PROBE_FORMAT, "model": cfg.model.name, "lineage": cfg.run.name,
                                          "probe_block": str(num_blocks), "probe_norm": f.probe_norm,
                                          "init_from": summary["init_from"], "classes": json.dumps(base.classes)})
        layout.summary.write_text(json.dumps(summary, indent=2))
        log.info("summary: %s", json.dumps(summary))
    loop.close()
    return summary

