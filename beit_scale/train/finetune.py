"""Fine-tuning: a BEiT classifier from pretrained (or intermediate fine-tuned) weights, layer-wise lr decay.

The recipe of the BEiT paper (arXiv 2106.08254, sec. 2.5 and appendix): mean-pooled patch tokens, LayerNorm,
linear head; AdamW with per-layer lr scales; RandAugment, random erasing, mixup/cutmix and label smoothing
(timm's); evaluation on a centre crop. The chain pt22k -> pt22k_ft22k -> pt22k_ft22k_ft1k is this job run
twice, ``finetune.init_from`` pointing at the previous run.

Augmentation is a pure function of (seed, epoch, sample index) and mixup draws from the numpy RNG that
checkpoints restore, so a resumed run trains on exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.export import CLASSIFIER_FORMAT, checkpoint_rank0_state, ema_weights_file
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.weights import save_weights
from beit_scale.config import Config
from beit_scale.engine.core import backward_step
from beit_scale.engine.layer_decay import format_group_table, layer_decay_param_groups, param_names_per_group
from beit_scale.models import build_classifier, get_spec
from beit_scale.models.flops import backbone_flops, head_flops, train_flops
from beit_scale.train.classify import ClassifierTask, evaluate, load_initial_weights
from beit_scale.train.driver import MicroStep, Run, drive

log = logging.getLogger(__name__)


def finetune_step(engine, images: torch.Tensor, targets: torch.Tensor, criterion: Callable) -> tuple[torch.Tensor, bool]:
    """One micro step outside the driver (reference tests): logits, loss against (possibly soft) targets,
    backward, step. Returns the detached loss and whether the optimizer step was applied."""
    loss = criterion(engine(images).float(), targets)
    return loss.detach(), backward_step(engine, loss)


def build_mixup(cfg: Config, num_classes: int):
    """timm's Mixup/CutMix (label smoothing folded into the targets), or None when both alphas are 0."""
    f = cfg.finetune
    if f.mixup <= 0 and f.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                 mode="batch", label_smoothing=f.label_smoothing, num_classes=num_classes)


def build_ema(model: nn.Module, cfg: Config, device):
    """timm's ModelEmaV3 of the fp32 weights (made before DeepSpeed casts the model), or None."""
    if cfg.finetune.ema_decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg.finetune.ema_decay, device=device, dtype=torch.float32)
    ema.foreach = True  # timm turns it off for a model still on the CPU; DeepSpeed moves it to `device`
    return ema


def restore_ema(ema, engine, layout: RunLayout, step: int) -> None:
    """After a resume: the EMA weights saved with the checkpoint, or (none saved) the resumed weights."""
    if ema is None or step == 0:
        return
    saved = checkpoint_rank0_state(layout, step).get("ema")
    if saved is None:
        log.warning("checkpoint of step %d holds no EMA weights; the EMA restarts from the resumed weights", step)
        saved = engine.module.state_dict()
    ema.module.load_state_dict(saved, strict=True)


class Finetune(ClassifierTask):
    """Fine-tuning on the driver: layer-decay groups, mixup/cutmix on the CPU, an optional EMA."""

    def build_model(self, run: Run):
        cfg, f = run.cfg, run.cfg.finetune
        model = build_classifier(get_spec(cfg.model.name), self.num_classes, self.img_size, cfg.model.drop_path,
                                 cfg.model.layer_scale, f.head_init_scale)
        model.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self.source = load_initial_weights(model, cfg, run.layout, run.rank)
        groups = layer_decay_param_groups(model, cfg.optim.weight_decay, f.layer_decay)
        if run.rank == 0:
            log.info("optimizer groups (layer decay %g):\n%s", f.layer_decay,
                     format_group_table(groups, param_names_per_group(model, groups)))
        self.ema = build_ema(model, cfg, run.device)
        self.mixup = build_mixup(cfg, self.num_classes)
        self.criterion = (SoftTargetCrossEntropy() if self.mixup
                          else partial(F.cross_entropy, label_smoothing=f.label_smoothing))
        return model, groups

    def describe(self, run: Run) -> str:
        return (f"fine-tuning {run.cfg.model.name} at {self.img_size} px, {self.num_classes} classes, on "
                f"{len(self.indices)} of {len(self.base)} images")

    def flops_per_image(self, run: Run) -> float:
        spec = get_spec(run.cfg.model.name)
        return train_flops(backbone_flops(spec, self.img_size) + head_flops(spec, 1, self.num_classes))

    def start(self, run: Run) -> None:
        super().start(run)
        restore_ema(self.ema, run.engine, run.layout, run.loop.state.step)

    def micro_step(self, run: Run, batch: dict, step: int) -> MicroStep:
        images, targets = batch["image"], batch["label"]
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)  # on the CPU, from the checkpointed numpy RNG
        logits = run.engine(images.to(run.device, run.dtype, non_blocking=True))  # (B, num_classes)
        return MicroStep(self.criterion(logits.float(), targets.to(run.device, non_blocking=True)), {})

    def step_done(self, run: Run, step: int, kept: list) -> None:
        if self.ema is not None:
            self.ema.update(run.engine.module, step=step)

    def evaluate(self, run: Run) -> dict[str, float]:
        results = super().evaluate(run)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val, run.device, torch.float32)
            results.update({f"{k}_ema": v for k, v in ema.items() if k != "val_images"})
        return results

    def rank_state(self, run: Run) -> dict:
        return {"ema": self.ema.module.state_dict()} if self.ema is not None and run.rank == 0 else {}

    def finish(self, run: Run, last: dict) -> dict:
        results = self.final_evaluation(run)
        weights = full_state_dict(run.engine)  # collective under ZeRO-3
        summary = {**results, **self.summary(run, self.source),
                   "init_lineage": (self.source.lineage or "") if self.source else ""}
        if run.rank == 0:
            meta = {"format": CLASSIFIER_FORMAT, "model": run.cfg.model.name, "lineage": run.cfg.run.name,
                    "parent_lineage": summary["init_lineage"], "num_classes": str(self.num_classes),
                    "img_size": str(self.img_size), "classes": json.dumps(self.base.classes)}
            save_weights(weights, run.layout.model, meta)
            if self.ema is not None:
                save_weights({k: v.detach().float().cpu() for k, v in self.ema.module.state_dict().items()},
                             ema_weights_file(run.layout), meta)
            log.info("wrote %s (lineage %s)", run.layout.model, run.cfg.run.name)
        return summary


def run(cfg: Config) -> dict:
    """Fine-tune per ``cfg``; returns the summary that rank 0 also writes to ``summary.json``."""
    return drive(cfg, Finetune())
