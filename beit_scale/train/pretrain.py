"""Stage 2: masked image modeling. The tokenizer labels masked patches; BEiT predicts them."""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from beit_scale.adapters import patch_grid
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.tokenizer_file import load_tokenizer
from beit_scale.checkpoint.weights import save_weights
from beit_scale.config import Config
from beit_scale.data import EvalTwoView, MIMDataset, make_loader, open_images
from beit_scale.data.fast_views import finish_batch, takes_arrays, two_view_transform
from beit_scale.engine.core import backward_step
from beit_scale.masking import build_mask_generator
from beit_scale.models import build_mim_model, get_spec, masked_positions
from beit_scale.models.flops import backbone_flops, head_flops, train_flops
from beit_scale.tokenizers import codebook_stats
from beit_scale.tokenizers.labeler import Labeler
from beit_scale.train.driver import MicroStep, Run, Task, drive
from beit_scale.train.images import save_mask_grid

log = logging.getLogger(__name__)


def to_device(batch: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, tokenizer views, mask, flat masked indices) on the device; indices found on the CPU (no sync)."""
    masked_idx = masked_positions(batch["mask"])  # (n_masked,)
    return (batch["image"].to(device, dtype, non_blocking=True),
            batch["tokenizer_view"].to(device, non_blocking=True),
            batch["mask"].to(device, non_blocking=True),  # (B, N) bool
            masked_idx.to(device, non_blocking=True))


class MIMOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, on the device
    hits: torch.Tensor  # (n_masked,) bool: the predicted token is the target
    targets: torch.Tensor  # (n_masked,) visual tokens


def mim_forward(model, tokenizer, batch: dict, device, dtype) -> MIMOutput:
    """BEiT's objective on one micro batch: label the masked patches with the tokenizer, predict them."""
    images, views, mask, masked_idx = to_device(batch, device, dtype)
    with torch.no_grad():
        targets = tokenizer.encode(views).flatten().index_select(0, masked_idx)  # (n_masked,)
    logits = model(images, mask, masked_idx)  # (n_masked, vocab)
    loss = F.cross_entropy(logits.float(), targets)
    return MIMOutput(loss, logits.argmax(-1) == targets, targets)


class StepResult(NamedTuple):
    loss: torch.Tensor
    accuracy: torch.Tensor
    targets: torch.Tensor
    applied: bool  # False when the optimizer step was skipped for a non-finite loss or gradient


def pretrain_step(engine, tokenizer, batch: dict, device, dtype) -> StepResult:
    """One micro step outside the driver (benchmarks, reference tests): MIM loss, backward, step."""
    out = mim_forward(engine, tokenizer, batch, device, dtype)
    return StepResult(out.loss.detach(), out.hits.float().mean(), out.targets, backward_step(engine, out.loss))


class Pretrain(Task):
    """Masked image modeling on the driver: one MIM loss per micro batch, token statistics, held-out accuracy."""

    def build(self, run: Run):
        cfg = run.cfg
        self.grid, self.img_size = patch_grid(cfg)
        self.tokenizer = load_tokenizer(cfg.tokenizer.path).to(run.device)
        m = cfg.masking
        self.mask_gen = build_mask_generator(m.kind, (self.grid, self.grid), m.num_masked, m.min_block_patches,
                                             m.min_aspect)
        self.token_counts = torch.zeros(self.tokenizer.vocab_size, dtype=torch.long, device=run.device)
        self.model = build_mim_model(cfg.model, self.tokenizer.vocab_size)
        return self.model, None

    def describe(self, run: Run) -> str:
        return (f"pretraining {run.cfg.model.name} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M "
                f"parameters); tokenizer {run.cfg.tokenizer.path} (vocab {self.tokenizer.vocab_size})")

    def train_set(self, run: Run) -> MIMDataset:
        d, tok = run.cfg.data, self.tokenizer
        # `micro_step` finishes the views on the device (fast: the loader hands over uint8 views)
        self.view_transform = two_view_transform(d.transform, self.img_size, tok.input_size, scale=d.crop_scale,
                                                 hflip=d.hflip, color_jitter=d.color_jitter, mean=d.mean, std=d.std,
                                                 tokenizer_pixel_map=tok.map_pixels)
        images = open_images(d, d.root, arrays=takes_arrays(self.view_transform))
        return MIMDataset(images, self.view_transform, self.mask_gen, run.cfg.run.seed)

    def flops_per_image(self, run: Run) -> float:
        """The BEiT's (the tokenizer's labelling is not counted): blocks over every patch, head on the masked."""
        spec = get_spec(run.cfg.model.name)
        return train_flops(backbone_flops(spec, self.img_size)
                           + head_flops(spec, run.cfg.masking.num_masked, self.tokenizer.vocab_size))

    def start(self, run: Run) -> None:
        precision = run.cfg.tokenizer.precision
        self.labeler = Labeler(self.tokenizer, precision, channels_last=run.device.type == "cuda",
                               compile=run.compiled)
        self.agreement_checked = precision == "fp32"
        log.info("the tokenizer labels in %s%s%s", precision if precision == "fp32" else
                 f"{precision} autocast (its bottom stage in fp32)", ", channels-last" if self.labeler.channels_last
                 else "", ", compiled" if run.compiled else "")

    def check_agreement(self, run: Run, batch: dict) -> None:
        """Once per process: how often the reduced-precision labels equal fp32's on this batch (one host sync)."""
        views = batch["tokenizer_view"].to(run.device)
        agree = self.labeler.agreement(views)
        level = logging.WARNING if agree < 0.99 else logging.INFO
        log.log(level, "tokenizer.precision=%s labels agree with fp32 on %.2f%% of the first batch's %d positions%s",
                run.cfg.tokenizer.precision, 100 * agree, views.shape[0] * self.tokenizer.grid_size ** 2,
                "" if agree >= 0.99 else "; below 99%: the targets are noisier than fp32's, set tokenizer.precision=fp32")
        self.agreement_checked = True

    def micro_step(self, run: Run, batch: dict, step: int) -> MicroStep:
        batch = finish_batch(batch, self.view_transform, run.device)
        if step == 0 and run.rank == 0:
            save_mask_grid(batch, run.cfg.data.mean, run.cfg.data.std, run.layout.images / "masks.png", run.writer)
        if not self.agreement_checked:
            self.check_agreement(run, batch)
        out = mim_forward(run.engine, self.labeler, batch, run.device, run.dtype)
        return MicroStep(out.loss, {"mask_acc": out.hits.float().mean()}, out.targets)

    def step_done(self, run: Run, step: int, kept: list) -> None:
        for targets in kept:
            self.token_counts.scatter_add_(0, targets, torch.ones_like(targets))  # bincount would sync

    def log_values(self, run: Run) -> dict[str, float]:
        if run.cfg.tokenizer.precision == "fp32" or self.labeler.nonfinite is None:
            return {}
        return {"tokenizer_nonfinite": float(self.labeler.nonfinite)}  # > 0: an fp16 overflow, use fp32 or bf16

    def finish(self, run: Run, last: dict) -> dict:
        weights = full_state_dict(run.engine)
        if run.rank == 0:
            save_weights(weights, run.layout.model, {"format": "beit_scale.mim.v1", "model": run.cfg.model.name})
            log.info("wrote %s", run.layout.model)
        summary = {"train_masked_token_accuracy": last.get("mask_acc", float("nan"))}
        if run.cfg.data.val_root:
            summary.update(evaluate(run, self.labeler, self.mask_gen, self.img_size))
        if dist.is_initialized():
            dist.all_reduce(self.token_counts)
        usage, perplexity = codebook_stats_from_counts(self.token_counts)
        return {**summary, "target_codebook_usage": usage, "target_perplexity": perplexity}


def run(cfg: Config) -> dict:
    """Pretrain per ``cfg``; returns the summary that rank 0 also writes to ``summary.json``."""
    return drive(cfg, Pretrain())


def codebook_stats_from_counts(counts: torch.Tensor) -> tuple[float, float]:
    """(fraction of the vocabulary used, perplexity) of a token histogram."""
    ids = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    usage, perplexity = codebook_stats(ids, len(counts))
    return float(usage), float(perplexity)


@torch.no_grad()
def evaluate(run: Run, tokenizer, mask_gen, img_size: int) -> dict:
    """Masked-token accuracy on held-out images, beside always guessing the held-out's most frequent token."""
    cfg, d = run.cfg, run.cfg.data
    transform = EvalTwoView(img_size, tokenizer.input_size, mean=d.mean, std=d.std,
                            tokenizer_pixel_map=tokenizer.map_pixels)
    val_set = MIMDataset(open_images(d, d.val_root), transform, mask_gen, cfg.run.seed + 1)
    loader = make_loader(val_set, cfg.train.micro_batch, d.num_workers, cfg.run.seed, train=False)
    correct = torch.zeros((), dtype=torch.long, device=run.device)
    total = torch.zeros_like(correct)
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long, device=run.device)
    run.engine.eval()
    for i, batch in enumerate(loader):
        if i == cfg.train.eval_batches:  # every rank has the same number of batches (padded sampler)
            break
        out = mim_forward(run.engine, tokenizer, batch, run.device, run.dtype)
        correct += out.hits.sum()
        total += out.targets.numel()
        counts.scatter_add_(0, out.targets, torch.ones_like(out.targets))
    run.engine.train()
    stats = torch.stack([correct, total])
    if dist.is_initialized():
        dist.all_reduce(stats)
        dist.all_reduce(counts)
    correct_n, total_n = stats.tolist()
    return {"masked_token_accuracy": correct_n / total_n,
            "majority_token_accuracy": counts.max().item() / total_n,
            "eval_masked_tokens": total_n}

