"""Linear probing: a linear classifier on frozen BEiT features (arXiv 2106.08254, appendix).

Features are the average-pooled patch tokens after ``finetune.probe_block`` blocks, normalised without affine
parameters (BatchNorm as in MAE's probe, or LayerNorm), then one linear layer (:class:`LinearProbe`). Only the
head trains. The released BEiT script instead concatenates [CLS] and the mean patch token of every block and
trains one head per block (AdamW, lr 4e-3, weight decay 1e-4, 100 epochs, batch 1024): sweep ``probe_block`` to
do the same.

It runs on the same driver and DeepSpeed engine as the other jobs, any ZeRO stage: the backbone's parameters are
frozen (no optimizer state, no gradients). BatchNorm statistics are per rank during training, as without
SyncBatchNorm; its running statistics are averaged over ranks before every evaluation and before saving, so all
ranks evaluate the same classifier.
"""
from __future__ import annotations

import json

import torch.nn.functional as F

from beit_scale.checkpoint.export import PROBE_FORMAT
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.weights import save_weights
from beit_scale.config import Config
from beit_scale.models import LinearProbe, build_classifier, get_spec
from beit_scale.models.flops import backbone_flops, head_flops, train_flops
from beit_scale.models.probe import average_norm_stats
from beit_scale.train.classify import ClassifierTask, load_initial_weights
from beit_scale.train.driver import MicroStep, Run, drive


class Linprobe(ClassifierTask):
    """The frozen backbone of ``finetune.init_from`` cut after ``probe_block`` blocks, and a trained head."""

    augment = False

    def build_model(self, run: Run):
        cfg, f = run.cfg, run.cfg.finetune
        spec = get_spec(cfg.model.name)
        backbone = build_classifier(spec, 0, self.img_size, drop_path=0.0, layer_scale=cfg.model.layer_scale)
        backbone.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self.source = load_initial_weights(backbone, cfg, run.layout, run.rank)
        self.num_blocks = f.probe_block or spec.depth
        return LinearProbe(backbone, self.num_blocks, self.num_classes, f.probe_norm), None

    def describe(self, run: Run) -> str:
        f = run.cfg.finetune
        return (f"linear probe of {run.cfg.model.name} after block {self.num_blocks}/{get_spec(run.cfg.model.name).depth}"
                f" ({f.probe_norm}), {self.num_classes} classes, {len(self.indices)} of {len(self.base)} images")

    def flops_per_image(self, run: Run) -> float:
        """The frozen blocks run forward only; the head trains."""
        spec = get_spec(run.cfg.model.name)
        return train_flops(head_flops(spec, 1, self.num_classes), backbone_flops(spec, self.img_size, self.num_blocks))

    def micro_step(self, run: Run, batch: dict, step: int) -> MicroStep:
        labels = batch["label"].to(run.device, non_blocking=True)
        logits = run.engine(batch["image"].to(run.device, run.dtype, non_blocking=True))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=run.cfg.finetune.label_smoothing)
        return MicroStep(loss, {"train_top1": (logits.argmax(-1) == labels).float().mean()})

    def evaluate(self, run: Run) -> dict[str, float]:
        average_norm_stats(run.engine.module)  # every rank evaluates the same classifier
        return super().evaluate(run)

    def finish(self, run: Run, last: dict) -> dict:
        results = self.final_evaluation(run)
        if self.val is None:
            average_norm_stats(run.engine.module)  # what is saved is what every rank would evaluate
        weights = full_state_dict(run.engine)  # collective under ZeRO-3
        summary = {**results, **self.summary(run, self.source), "train_top1": last.get("train_top1", float("nan")),
                   "probe_block": self.num_blocks, "probe_norm": run.cfg.finetune.probe_norm}
        if run.rank == 0:
            head = {k: v for k, v in weights.items() if k.startswith(("norm.", "head."))}  # the backbone: init_from's
            save_weights(head, run.layout.model, {
                "format": PROBE_FORMAT, "model": run.cfg.model.name, "lineage": run.cfg.run.name,
                "probe_block": str(self.num_blocks), "probe_norm": run.cfg.finetune.probe_norm,
                "init_from": summary["init_from"], "classes": json.dumps(self.base.classes)})
        return summary


def run(cfg: Config) -> dict:
    """Train a linear probe per ``cfg``; returns the summary that rank 0 also writes to ``summary.json``."""
    return drive(cfg, Linprobe())
