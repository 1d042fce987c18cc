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
import random
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from beit_scale.checkpoint import RunLayout, faults
from beit_scale.checkpoint.export import (CLASSIFIER_FORMAT, WeightsSource, checkpoint_rank0_state, describe_source,
                                          ema_weights_file, materialize_source)
from beit_scale.checkpoint.files import committed_tags
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.weights import save_weights
from beit_scale.checks import patch_grid
from beit_scale.config import Config
from beit_scale.data import SafeImageFolder
from beit_scale.data.mim import sample_seeds
from beit_scale.engine.dist import init_distributed
from beit_scale.engine.layer_decay import format_group_table, layer_decay_param_groups, param_names_per_group
from beit_scale.models import build_classifier, get_spec, mim_to_classifier_state_dict
from beit_scale.train.common import (checkpoint_payload, claim_run_folder, make_loader, seed_everything,
                                    skip_nonfinite_step, start_engine, start_loop)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ data


class ClassificationSet(Dataset):
    """``{"image", "label", "index", "valid"}`` samples of ``base[indices[i]]``.

    The transform runs with torch, numpy and Python's ``random`` (timm's RandAugment uses all three) seeded from
    ``(seed, epoch, base index)``; the global states are restored afterwards. ``valid`` is False for the
    padding entries of an evaluation shard (counted nowhere).
    """

    def __init__(self, base: SafeImageFolder, indices: Sequence[int], transform: Callable, seed: int,
                 valid: Optional[Sequence[bool]] = None):
        self.base, self.indices, self.transform, self.seed = base, list(indices), transform, seed
        self.valid = list(valid) if valid is not None else [True] * len(self.indices)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        img, label = self.base[index]
        _, sample_seed = sample_seeds(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                random.seed(sample_seed)
                np.random.seed(sample_seed % 2**32)
                image = self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return {"image": image, "label": int(label), "index": index, "valid": self.valid[i]}


def class_balanced_subset(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of ``round(fraction * n_c)`` (at least 1) samples of every class, drawn with ``seed``."""
    if fraction >= 1.0:
        return list(range(len(targets)))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_class[int(t)].append(i)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in sorted(by_class):
        members = np.asarray(by_class[c])
        chosen += rng.permutation(members)[:max(1, round(fraction * len(members)))].tolist()
    return sorted(chosen)


def eval_shard(n: int, rank: int, world: int) -> tuple[list[int], list[bool]]:
    """This rank's strided share of ``n`` samples, padded so that every rank runs as many batches (ZeRO-3 gathers
    parameters collectively in each forward); padding entries are marked invalid, so each sample counts once."""
    per_rank = -(-n // world)
    positions = [rank + j * world for j in range(per_rank)]
    return [p % n for p in positions], [p < n for p in positions]


def train_transform(cfg: Config, img_size: int, augment: bool = True):
    """timm's ImageNet training transform from the recipe; ``augment=False``: crop and flip only (linear probe)."""
    from timm.data import create_transform

    d, f = cfg.data, cfg.finetune
    return create_transform(img_size, is_training=True, scale=d.crop_scale, hflip=d.hflip,
                            color_jitter=(d.color_jitter or None) if augment else None,
                            auto_augment=(f.auto_augment or None) if augment else None, interpolation="bicubic",
                            re_prob=f.re_prob if augment else 0.0, re_mode="pixel", re_count=1, mean=d.mean, std=d.std)


def eval_transform(cfg: Config, img_size: int):
    """Resize the shorter side to ``img_size / crop_pct`` (bicubic), centre crop ``img_size``."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=cfg.finetune.crop_pct,
                            mean=cfg.data.mean, std=cfg.data.std)


def train_images(cfg: Config) -> tuple[SafeImageFolder, list[int], int]:
    """(the training folder, the indices trained on, the number of classes)."""
    base = SafeImageFolder(cfg.data.root)
    num_classes = cfg.finetune.num_classes or len(base.classes)
    indices = class_balanced_subset(base.targets, cfg.finetune.train_fraction, cfg.run.seed)
    return base, indices, num_classes


def val_loader(cfg: Config, img_size: int, info) -> Optional[DataLoader]:
    if not cfg.data.val_root:
        return None
    base = SafeImageFolder(cfg.data.val_root)
    indices, valid = eval_shard(len(base), info.rank, info.world_size)
    dataset = ClassificationSet(base, indices, eval_transform(cfg, img_size), cfg.run.seed, valid)
    return DataLoader(dataset, batch_size=cfg.train.micro_batch, num_workers=cfg.data.num_workers, shuffle=False,
                      pin_memory=torch.cuda.is_available())


# --------------------------------------------------------------------------------------------------- weights


def load_initial_weights(model: nn.Module, cfg: Config, layout: RunLayout, rank: int) -> Optional[WeightsSource]:
    """Load ``finetune.init_from`` into ``model`` (a classifier, or its head-less backbone) on every rank.

    Converted by :func:`mim_to_classifier_state_dict` (pretraining or classifier weights, tables resized to the
    model's resolution, a head of another size dropped); returns None when there is nothing to load.

    Skipped when the run will resume from its own checkpoint (committed checkpoints either resume or fail).
    A checkpoint source is consolidated by rank 0 only, into a file the other ranks then read.
    """
    f = cfg.finetune
    if not f.init_from:
        log.info("no finetune.init_from: training from random initialisation")
        return None
    if cfg.checkpoint.resume and committed_tags(layout.checkpoints):
        log.info("a committed checkpoint exists: its weights replace finetune.init_from=%s", f.init_from)
        return None
    source = describe_source(f.init_from)
    path = materialize_source(source, layout, rank)
    if dist.is_initialized():
        dist.barrier()
    from safetensors.torch import load_file

    state = load_file(str(path))
    model.load_state_dict(mim_to_classifier_state_dict(state, model), strict=True)
    log.info("initialised from %s (%s, trained as %s, lineage %s)", source.path, source.kind, source.model,
             source.lineage)
    return source


# ------------------------------------------------------------------------------------------------------- loop


def finetune_step(engine, images: torch.Tensor, targets: torch.Tensor, criterion: Callable,
                  loss_hook: Optional[Callable] = None) -> tuple[torch.Tensor, bool]:
    """One micro step: logits, loss against (possibly soft) targets, backward, step.

    Returns the detached loss and whether the optimizer step was applied (False: skipped for a non-finite
    loss or gradient, on every rank alike).
    """
    from beit_scale.engine.core import guarded_step

    logits = engine(images)  # (B, num_classes)
    loss = criterion(logits.float(), targets)
    if loss_hook is not None:
        loss = loss_hook(loss)
    engine.backward(loss)
    return loss.detach(), guarded_step(engine)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against mixed (soft) targets, as timm's SoftTargetCrossEntropy."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def build_mixup(cfg: Config, num_classes: int):
    """timm's Mixup/CutMix (label smoothing folded into the targets), or None when both alphas are 0."""
    f = cfg.finetune
    if f.mixup <= 0 and f.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob, switch_prob=f.mixup_switch_prob,
                 mode="batch", label_smoothing=f.label_smoothing, num_classes=num_classes)


@torch.no_grad()
def evaluate(forward: Callable, loader: DataLoader, device, dtype) -> dict[str, float]:
    """Top-1/top-5 accuracy over the whole validation split, all-reduced over ranks (each image counted once)."""
    counts = torch.zeros(3, dtype=torch.long, device=device)  # top-1 hits, top-5 hits, images
    for batch in loader:
        logits = forward(batch["image"].to(device, dtype, non_blocking=True))
        labels = batch["label"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, k)
        hits = top == labels[:, None]
        counts += torch.stack([(hits[:, 0] & valid).sum(), (hits.any(-1) & valid).sum(), valid.sum()])
    if dist.is_initialized():
        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "val_images": n}


def log_eval(results: dict[str, float], step: int, writer, metrics_file: Optional[Path]) -> None:
    log.info("eval at step %d: %s", step, " ".join(f"{k} {v:.4g}" for k, v in results.items()))
    if writer is not None:
        for k, v in results.items():
            writer.add_scalar(f"eval/{k}", v, step)
    if metrics_file is not None:
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "eval": results}) + "\n")


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


def run(cfg: Config) -> dict:
    """Fine-tune per ``cfg``; returns the summary that rank 0 also writes to ``summary.json``."""
    info = init_distributed()
    seed_everything(cfg.run.seed)
    f, d = cfg.finetune, cfg.data
    _, img_size = patch_grid(cfg)
    layout = claim_run_folder(cfg, info)

    base, indices, num_classes = train_images(cfg)
    model = build_classifier(get_spec(cfg.model.name), num_classes, img_size, cfg.model.drop_path,
                             cfg.model.layer_scale, f.head_init_scale)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    source = load_initial_weights(model, cfg, layout, info.rank)
    groups = layer_decay_param_groups(model, cfg.optim.weight_decay, f.layer_decay)
    if info.rank == 0:
        log.info("optimizer groups (layer decay %g):\n%s", f.layer_decay,
                 format_group_table(groups, param_names_per_group(model, groups)))
    ema = build_ema(model, cfg, info.device)
    _, engine, schedule, dtype = start_engine(cfg, model, info, groups)
    log.info("fine-tuning %s at %d px, %d classes, on %d of %d images, %d rank(s), %s, ZeRO %d",
             cfg.model.name, img_size, num_classes, len(indices), len(base), info.world_size, dtype,
             engine.zero_optimization_stage())

    train_set = ClassificationSet(base, indices, train_transform(cfg, img_size), cfg.run.seed)
    loader = make_loader(train_set, cfg.train.micro_batch, d.num_workers, cfg.run.seed, train=True)
    val = val_loader(cfg, img_size, info)
    loop = start_loop(cfg, layout, info, engine, loader)
    state, batches, writer, meter, trace = (loop.state, loop.batches, loop.writer, loop.meter,
                                            loop.trace)
    metrics_file = meter.metrics_file
    restore_ema(ema, engine, layout, state.step)
    mixup = build_mixup(cfg, num_classes)
    criterion = soft_cross_entropy if mixup else partial(F.cross_entropy, label_smoothing=f.label_smoothing)

    def run_eval(step: int) -> dict[str, float]:
        engine.eval()
        results = evaluate(engine, val, info.device, dtype)
        engine.train()
        if ema is not None:
            results.update({f"{k}_ema": v for k, v in evaluate(ema.module, val, info.device, torch.float32).items()
                            if k != "val_images"})
        log_eval(results, step, writer, metrics_file)
        return results

    last, results = {"loss": float("nan")}, {}
    engine.train()
    while state.step < cfg.train.total_steps:
        step = state.step
        schedule.apply(step)
        losses, applied = [], True
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            trace.add(step + 1, batch["index"])
            images, labels = batch["image"], batch["label"]
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)  # on the CPU, from the checkpointed numpy RNG
            loss, applied = finetune_step(engine, images.to(info.device, dtype, non_blocking=True),
                                          targets.to(info.device, non_blocking=True), criterion,
                                          partial(faults.poison, step=step + 1, rank=info.rank))
            losses.append(loss)
        if not applied:  # DeepSpeed decides at the boundary, the same on every rank
            skip_nonfinite_step(state, cfg, layout)
            continue
        for loss in losses:
            meter.add(loss=loss)
        state.consecutive_skips = 0
        state.step = step + 1
        if ema is not None:
            ema.update(engine.module, step=state.step)
        meter.step_done()
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.total_steps:
            norm = engine.get_global_grad_norm()
            last = meter.flush(step, lr=max(g["lr"] for g in engine.optimizer.param_groups),
                               grad_norm=float("nan") if norm is None else float(norm))
        if val is not None and f.eval_every and state.step % f.eval_every == 0 and state.step < cfg.train.total_steps:
            run_eval(state.step)
        loop.end_step(engine, lambda: {**checkpoint_payload(state), **(
            {"ema": ema.module.state_dict()} if ema is not None and info.rank == 0 else {})})

    images_per_second = meter.images_per_second
    if val is not None:
        results = run_eval(cfg.train.total_steps)
    else:
        log.warning("no data.val_root: no top-1/top-5 evaluation")
    weights = full_state_dict(engine)  # collective under ZeRO-3
    summary = {**results, "final_loss": last["loss"], "steps": cfg.train.total_steps, "num_classes": num_classes,
               "train_images": len(indices), "img_size": img_size, "lineage": cfg.run.name,
               "init_from": str(source.path) if source else "", "init_lineage": (source.lineage or "") if source else "",
               "images_per_second": images_per_second, "world_size": info.world_size, "restarts": state.restarts,
               "skipped_steps": state.skipped_steps}
    if info.rank == 0:
        meta = {"format": CLASSIFIER_FORMAT, "model": cfg.model.name, "lineage": cfg.run.name,
                "parent_lineage": summary["init_lineage"], "num_classes": str(num_classes), "img_size": str(img_size),
                "classes": json.dumps(base.classes)}
        save_weights(weights, layout.model, meta)
        if ema is not None:
            save_weights({k: v.detach().float().cpu() for k, v in ema.module.state_dict().items()},
                         ema_weights_file(layout), meta)
        layout.summary.write_text(json.dumps(summary, indent=2))
        log.info("summary: %s", json.dumps(summary))
        log.info("wrote %s (lineage %s) and %s", layout.model, cfg.run.name, layout.summary)
    loop.close()
    return summary
