"""Semantic segmentation on the driver (arXiv 2106.08254, sec. 3.2; the reference's ``upernet_beit_*`` configs).

BEiT + UperNet (:class:`~beit_scale.models.segmentation.BeitSegmenter`) with its backbone loaded from
``segment.init_from``; AdamW with layer-wise lr decay (adapters and heads at the top layer), the poly schedule
with linear warmup (``optim.schedule=poly``); mmseg's training pipeline on ``data.root`` in the ADE20K layout
(rescale by a random ratio, crop with ``cat_max_ratio``, flip, photometric distortion, pad); evaluation on the
validation split with sliding windows at the original label size, every ``segment.eval_every`` steps and at the
end: mIoU, mAcc, aAcc and the IoU of each class.

BatchNorm in the adapters and heads: SyncBatchNorm over the ranks on GPUs, as the reference trains. On the CPU
(gloo has no SyncBatchNorm) each rank normalises its own micro batch and the running statistics are averaged
over the ranks after every optimizer step, so that all ranks, and the checkpoint written from rank 0, hold the
same statistics and a resumed run evaluates as an uninterrupted one.

Augmentation is a pure function of (seed, epoch, sample index) and the driver restores the RNGs drop path and
dropout draw from, so a resumed run trains on exactly the batches and masks an uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
from timm.utils import distribute_bn
from torch import nn
from torch.utils.data import DataLoader, Subset

from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.export import WeightsSource, describe_source, materialize_source
from beit_scale.checkpoint.files import committed_tags
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.weights import save_weights
from beit_scale.config import Config
from beit_scale.data.segmentation import ADE20KFolder, SegEvalTransform, SegmentationSet, SegTrainTransform
from beit_scale.engine.layer_decay import format_group_table, layer_decay_param_groups, param_names_per_group
from beit_scale.models import get_spec
from beit_scale.models.segmentation import BeitSegmenter, segmentation_loss, slide_inference
from beit_scale.train.driver import MicroStep, Run, Task, drive
from beit_scale.train.metrics import log_eval
from beit_scale.train.seg_metrics import SegmentationMeter

log = logging.getLogger(__name__)

SEGMENTER_FORMAT = "beit_scale.segmenter.v1"  # written by `beit-scale segment`


def load_backbone_weights(model: BeitSegmenter, cfg: Config, layout: RunLayout, rank: int) -> Optional[WeightsSource]:
    """Load ``segment.init_from`` into ``model``'s backbone on every rank; returns what it is (None: no source).

    A pretraining, fine-tuning or timm-export source, with its relative position tables resized to the crop
    (:meth:`BeitSegmenter.load_backbone`). Not loaded when the run will resume from its own checkpoint (the source
    is still returned, for the summary's lineage). A checkpoint source is consolidated by rank 0 only, into a file
    the other ranks then read.
    """
    s = cfg.segment
    if not s.init_from:
        log.info("no segment.init_from: the backbone starts from random initialisation")
        return None
    source = describe_source(s.init_from, "segment.init_from")  # metadata only: the summary's lineage
    if cfg.checkpoint.resume and committed_tags(layout.checkpoints):
        log.info("a committed checkpoint exists: its weights replace segment.init_from=%s", s.init_from)
        return source
    path = materialize_source(source, layout, rank)
    if dist.is_initialized():
        dist.barrier()
    from safetensors.torch import load_file

    model.load_backbone(load_file(str(path)))
    log.info("initialised the backbone from %s (%s, trained as %s, lineage %s)", source.path, source.kind,
             source.model, source.lineage)
    return source


def val_loader(cfg: Config, rank: int, world_size: int) -> tuple[DataLoader, int]:
    """This rank's strided share of the validation split (``segment.eval_images`` first images), one image a batch:
    each is rescaled to ``segment.scale`` and scored against its label at the original size. Returns the loader
    and the number of images all ranks evaluate together."""
    s = cfg.segment
    base = ADE20KFolder(cfg.data.root, "validation", s.reduce_zero_label)
    count = min(s.eval_images, len(base)) if s.eval_images else len(base)
    dataset = Subset(SegmentationSet(base, SegEvalTransform(s.scale), cfg.run.seed), range(rank, count, world_size))
    # Its own generator: iterating must not draw from the global RNG that drop path uses (exact resume).
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=cfg.data.num_workers,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(cfg.run.seed))
    return loader, count


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None  # JSON has no NaN: a class absent from labels and predictions


class Segment(Task):
    """BEiT + UperNet trained on an ADE20K-layout folder, scored by sliding-window mIoU."""

    def build(self, run: Run):
        cfg, s = run.cfg, run.cfg.segment
        self.base = ADE20KFolder(cfg.data.root, "training", s.reduce_zero_label)
        self.class_names = list(s.class_names) or [str(i) for i in range(s.num_classes)]
        model = BeitSegmenter(get_spec(cfg.model.name), s.num_classes, s.crop_px, cfg.model.drop_path,
                              cfg.model.layer_scale, s.channels or None, s.aux_channels, dropout=s.dropout)
        model.backbone.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self.source = load_backbone_weights(model, cfg, run.layout, run.rank)
        self.sync_bn = run.device.type == "cuda" and run.info.world_size > 1
        if self.sync_bn:  # the same Parameters in SyncBatchNorm modules: the groups below still hold them
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        groups = layer_decay_param_groups(model, cfg.optim.weight_decay, s.layer_decay)
        if run.rank == 0:
            log.info("optimizer groups (layer decay %g):\n%s", s.layer_decay,
                     format_group_table(groups, param_names_per_group(model, groups)))
        return model, groups

    def describe(self, run: Run) -> str:
        s = run.cfg.segment
        return (f"segmentation with {run.cfg.model.name} + UperNet on {s.crop_px} px crops, {s.num_classes} classes, "
                f"{len(self.base)} training images ({'SyncBatchNorm' if self.sync_bn else 'BatchNorm per rank'})")

    def train_set(self, run: Run) -> SegmentationSet:
        cfg, s = run.cfg, run.cfg.segment
        transform = SegTrainTransform(s.crop_px, s.scale, s.ratio_range, s.cat_max_ratio, cfg.data.hflip,
                                      s.photometric)
        return SegmentationSet(self.base, transform, cfg.run.seed)

    def start(self, run: Run) -> None:
        self.val, self.val_images = val_loader(run.cfg, run.rank, run.info.world_size)

    def micro_step(self, run: Run, batch: dict, step: int) -> MicroStep:
        images = batch["image"].to(run.device, run.dtype, non_blocking=True)  # (B, 3, crop, crop)
        labels = batch["label"].to(run.device, non_blocking=True)  # (B, crop, crop), 255 = ignored
        losses = segmentation_loss(run.engine(images), labels, run.cfg.segment.aux_weight)
        return MicroStep(losses["loss"], {"loss_main": losses["loss_main"].detach(),
                                          "loss_aux": losses["loss_aux"].detach()})

    def step_done(self, run: Run, step: int, kept: list) -> None:
        if not self.sync_bn and run.info.world_size > 1:
            distribute_bn(run.engine.module, run.info.world_size, reduce=True)

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        """mIoU, mAcc and aAcc over the validation split (all ranks); sets ``self.per_class_iou``."""
        s = run.cfg.segment
        meter = SegmentationMeter(s.num_classes, device=run.device)

        def forward(windows: torch.Tensor) -> torch.Tensor:
            return run.engine(windows.to(run.dtype))

        run.engine.eval()
        for batch in self.val:
            image = batch["image"].to(run.device, non_blocking=True)  # (1, 3, H, W), rescaled
            label = batch["label"].to(run.device, non_blocking=True)  # (1, H0, W0), the original size
            logits = slide_inference(forward, image, s.num_classes, s.crop_px, s.eval_stride,
                                     out_size=label.shape[-2:])
            meter.update(logits, label)
        run.engine.train()
        scores = meter.compute(self.class_names)
        self.per_class_iou = {n: _finite_or_none(scores[f"IoU.{n}"]) for n in self.class_names}
        return {"mIoU": scores["mIoU"], "mAcc": scores["mAcc"], "aAcc": scores["aAcc"], "val_images": self.val_images}

    def after_step(self, run: Run, step: int) -> None:
        every = run.cfg.segment.eval_every
        if every and step % every == 0 and step < run.cfg.train.total_steps:
            log_eval(self.evaluate(run), step, run.writer, run.loop.meter.metrics_file)

    def finish(self, run: Run, last: dict) -> dict:
        cfg, s = run.cfg, run.cfg.segment
        results = self.evaluate(run)
        log_eval(results, cfg.train.total_steps, run.writer, run.loop.meter.metrics_file)
        weights = full_state_dict(run.engine)
        parent = (self.source.lineage or "") if self.source else ""
        summary = {**results, "per_class_iou": self.per_class_iou, "num_classes": s.num_classes,
                   "crop_px": s.crop_px, "train_images": len(self.base), "lineage": cfg.run.name,
                   "init_from": str(self.source.path) if self.source else "", "init_lineage": parent}
        if run.rank == 0:
            meta = {"format": SEGMENTER_FORMAT, "model": cfg.model.name, "lineage": cfg.run.name,
                    "parent_lineage": parent, "num_classes": str(s.num_classes), "img_size": str(s.crop_px)}
            save_weights(weights, run.layout.model, meta)
            log.info("wrote %s (lineage %s)", run.layout.model, cfg.run.name)
        return summary


def run(cfg: Config) -> dict:
    """Train a segmenter per ``cfg``; returns the summary that rank 0 also writes to ``summary.json``."""
    return drive(cfg, Segment())
