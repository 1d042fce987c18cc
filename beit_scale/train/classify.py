"""What fine-tuning and linear probing share: labelled data from the recipe, the weights to start from, top-1/top-5
evaluation on a cadence, and the summary entries of a classifier."""
from __future__ import annotations

import abc
import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from beit_scale.adapters import patch_grid
from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.export import WeightsSource, describe_source, materialize_source
from beit_scale.checkpoint.files import committed_tags
from beit_scale.config import Config
from beit_scale.data import ClassificationSet, class_balanced_subset, eval_shard, open_images
from beit_scale.train.driver import Run, Task
from beit_scale.train.metrics import log_eval

log = logging.getLogger(__name__)


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


def val_loader(cfg: Config, img_size: int, info) -> Optional[DataLoader]:
    if not cfg.data.val_root:
        return None
    base = open_images(cfg.data, cfg.data.val_root)
    indices, valid = eval_shard(len(base), info.rank, info.world_size)
    dataset = ClassificationSet(base, indices, eval_transform(cfg, img_size), cfg.run.seed, valid)
    return DataLoader(dataset, batch_size=cfg.train.micro_batch, num_workers=cfg.data.num_workers, shuffle=False,
                      pin_memory=torch.cuda.is_available())


def load_initial_weights(model: nn.Module, cfg: Config, layout: RunLayout, rank: int) -> Optional[WeightsSource]:
    """Load ``finetune.init_from`` into ``model`` (a classifier, or its head-less backbone) on every rank.

    Converted by :func:`mim_to_classifier_state_dict` (pretraining or classifier weights, tables resized to the
    model's resolution, a head of another size dropped); returns None when there is nothing to load.

    Skipped when the run will resume from its own checkpoint (committed checkpoints either resume or fail).
    A checkpoint source is consolidated by rank 0 only, into a file the other ranks then read.
    """
    from beit_scale.models import mim_to_classifier_state_dict

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


class ClassifierTask(Task):
    """A classifier trained on labelled folders: the images, the source weights, evaluation every
    ``finetune.eval_every`` steps and at the end. Subclasses build the model and define the micro step."""

    augment = True  # the recipe's augmentation (fine-tuning) or crop and flip only (linear probing)

    def build(self, run: Run):
        cfg = run.cfg
        _, self.img_size = patch_grid(cfg)
        self.base = open_images(cfg.data, cfg.data.root)
        self.num_classes = cfg.finetune.num_classes or len(self.base.classes)
        self.indices = class_balanced_subset(self.base.targets, cfg.finetune.train_fraction, cfg.run.seed)
        model, groups = self.build_model(run)
        self.model = model
        return model, groups

    @abc.abstractmethod
    def build_model(self, run: Run) -> tuple[nn.Module, list[dict] | None]:
        """The model to train (self.num_classes and self.img_size are set) and its optimizer groups."""

    def train_set(self, run: Run) -> ClassificationSet:
        transform = train_transform(run.cfg, self.img_size, augment=self.augment)
        return ClassificationSet(self.base, self.indices, transform, run.cfg.run.seed)

    def start(self, run: Run) -> None:
        self.val = val_loader(run.cfg, self.img_size, run.info)
        if self.val is None:
            log.warning("no data.val_root: no top-1/top-5 evaluation")

    def evaluate(self, run: Run) -> dict[str, float]:
        """Top-1/top-5 of the model being trained on the validation split."""
        run.engine.eval()
        results = evaluate(run.engine, self.val, run.device, run.dtype)
        run.engine.train()
        return results

    def after_step(self, run: Run, step: int) -> None:
        every = run.cfg.finetune.eval_every
        if self.val is not None and every and step % every == 0 and step < run.cfg.train.total_steps:
            log_eval(self.evaluate(run), step, run.writer, run.loop.meter.metrics_file)

    def final_evaluation(self, run: Run) -> dict[str, float]:
        """The evaluation after the last step ({} without a validation split)."""
        if self.val is None:
            return {}
        results = self.evaluate(run)
        log_eval(results, run.cfg.train.total_steps, run.writer, run.loop.meter.metrics_file)
        return results

    def summary(self, run: Run, source: Optional[WeightsSource]) -> dict:
        """The summary entries every classifier run reports."""
        return {"num_classes": self.num_classes, "train_images": len(self.indices), "img_size": self.img_size,
                "lineage": run.cfg.run.name, "init_from": str(source.path) if source else ""}
