"""Stage 2: masked image modeling. The tokenizer labels masked patches; BEiT predicts them.

``masking.target=pixels`` is the paper's "recover masked pixels" ablation: no tokenizer runs, and a linear head
regresses each masked patch's pixels, normalised per patch as MAE's ``norm_pix_loss`` (MSE).
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple, Optional

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
from beit_scale.models.mim import normalized_patch_pixels
from beit_scale.tokenizers import codebook_stats
from beit_scale.tokenizers.labeler import Labeler
from beit_scale.train.driver import MicroStep, Run, Task, drive
from beit_scale.train.images import save_mask_grid
from beit_scale.train.visualize import pictures, write_pictures

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
    hits: Optional[torch.Tensor]  # (n_masked,) bool: the predicted token is the target; None for pixels
    targets: torch.Tensor  # (n_masked,) visual tokens, or (n_masked, patch**2 * 3) normalised pixels

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Logged beside the loss: the masked-token accuracy; nothing for pixels (the loss is the pixel MSE)."""
        return {} if self.hits is None else {"mask_acc": self.hits.float().mean()}

    @property
    def tokens(self) -> Optional[torch.Tensor]:
        """The visual tokens of the masked patches (the codebook statistics count them); None for pixels."""
        return None if self.hits is None else self.targets


def mim_forward(model, tokenizer, batch: dict, device, dtype) -> MIMOutput:
    """BEiT's objective on one micro batch: label the masked patches with the tokenizer, predict them.

    ``tokenizer=None`` (``masking.target=pixels``): regress the masked patches' patch-view pixels, each patch
    normalised by its own mean and variance (:func:`normalized_patch_pixels`); the loss is their MSE.
    """
    images, views, mask, masked_idx = to_device(batch, device, dtype)
    if tokenizer is None:
        patch = math.isqrt(images.shape[-2] * images.shape[-1] // mask.shape[1])  # px per patch side, from shapes
        with torch.no_grad():
            targets = normalized_patch_pixels(images, patch).flatten(0, 1).index_select(0, masked_idx)
        pred = model(images, mask, masked_idx)  # (n_masked, patch**2 * 3)
        return MIMOutput(F.mse_loss(pred.float(), targets), None, targets)
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


class NoTokenizer:
    """Stands in for the tokenizer under ``masking.target=pixels``, where none runs: the data pipeline still cuts a
    tokenizer view, so it is made at one pixel per patch (``input_size`` = the patch grid; the fast transform's box
    average of the patch view, the cheapest) and never read."""

    vocab_size = 0

    def __init__(self, input_size: int) -> None:
        self.input_size = self.grid_size = input_size

    @staticmethod
    def map_pixels(x: torch.Tensor) -> torch.Tensor:
        return x


class Pretrain(Task):
    """Masked image modeling on the driver: one MIM loss per micro batch, token statistics, held-out accuracy."""

    def build(self, run: Run):
        cfg = run.cfg
        self.grid, self.img_size = patch_grid(cfg)
        m = cfg.masking
        self.pixels = m.target == "pixels"
        # pixels: no tokenizer file is read; the stand-in only sizes the (unread) tokenizer view of the data pipeline
        self.tokenizer = (NoTokenizer(self.grid) if self.pixels
                          else load_tokenizer(cfg.tokenizer.path).to(run.device))
        self.mask_gen = build_mask_generator(m.kind, (self.grid, self.grid), m.num_masked, m.min_block_patches,
                                             m.min_aspect)
        self.token_counts = torch.zeros(self.tokenizer.vocab_size, dtype=torch.long, device=run.device)
        self.model = build_mim_model(cfg.model, self.tokenizer.vocab_size, m.target)
        return self.model, None

    def describe(self, run: Run) -> str:
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        size = f"pretraining {run.cfg.model.name} ({params:.2f}M parameters)"
        if self.pixels:
            return (f"{size}; target: the masked patches' pixels, normalised per patch "
                    "(no tokenizer, tokenizer.* unused)")
        return f"{size}; tokenizer {run.cfg.tokenizer.path} (vocab {self.tokenizer.vocab_size})"

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
        outputs = spec.patch_size ** 2 * 3 if self.pixels else self.tokenizer.vocab_size
        return train_flops(backbone_flops(spec, self.img_size) + head_flops(spec, run.cfg.masking.num_masked, outputs))

    def start(self, run: Run) -> None:
        if self.pixels:  # masking.target=pixels: no tokenizer labels anything
            self.labeler, self.agreement_checked = None, True
            return
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
        return MicroStep(out.loss, out.metrics, out.tokens)

    def step_done(self, run: Run, step: int, kept: list) -> None:
        if self.pixels:  # no tokens to count
            return
        for targets in kept:
            self.token_counts.scatter_add_(0, targets, torch.ones_like(targets))  # bincount would sync

    def log_values(self, run: Run) -> dict[str, float]:
        if self.labeler is None or run.cfg.tokenizer.precision == "fp32" or self.labeler.nonfinite is None:
            return {}
        return {"tokenizer_nonfinite": float(self.labeler.nonfinite)}  # > 0: an fp16 overflow, use fp32 or bf16

    def finish(self, run: Run, last: dict) -> dict:
        weights = full_state_dict(run.engine)
        if run.rank == 0:
            save_weights(weights, run.layout.model, {"format": "beit_scale.mim.v1", "model": run.cfg.model.name})
            log.info("wrote %s", run.layout.model)
        if run.cfg.data.val_root:
            self.eval_pictures(run)
        if self.pixels:  # the pixel MSE instead of token accuracy and codebook statistics
            summary = {"target": "pixels", "train_masked_pixel_loss": last.get("loss", float("nan"))}
            if run.cfg.data.val_root:
                summary.update(evaluate(run, None, self.mask_gen, self.img_size))
            return summary
        summary = {"train_masked_token_accuracy": last.get("mask_acc", float("nan"))}
        if run.cfg.data.val_root:
            summary.update(evaluate(run, self.labeler, self.mask_gen, self.img_size))
        if dist.is_initialized():
            dist.all_reduce(self.token_counts)
        usage, perplexity = codebook_stats_from_counts(self.token_counts)
        return {**summary, "target_codebook_usage": usage, "target_perplexity": perplexity}


    def eval_pictures(self, run: Run) -> None:
        """Rank 0: masks, tokenizer reconstructions, the images decoded from BEiT's predictions and the last block's
        [CLS] attention of the first held-out images, as PNGs in images/eval/ and in TensorBoard
        (`beit-scale visualize` draws the same for any images). Not under ZeRO-3, whose forward needs every rank."""
        if run.rank != 0:
            return
        if run.engine.zero_optimization_stage() == 3:
            log.info("no evaluation pictures under ZeRO-3: run `beit-scale visualize %s --images DIR` after the run",
                     run.cfg.run.output_dir)
            return
        tokenizer = None if self.pixels else self.tokenizer
        views = NoTokenizer(self.grid) if self.pixels else self.tokenizer
        batch = next(iter(held_out_batches(run, views, self.mask_gen, self.img_size)), None)
        if batch is not None:
            grids = pictures(run.engine, tokenizer, batch, run.cfg.data.mean, run.cfg.data.std)
            paths = write_pictures(grids, run.layout.images / "eval", run.writer, run.cfg.train.total_steps,
                                   tag="pretrain/eval")
            log.info("evaluation pictures: %s", ", ".join(str(p) for p in paths.values()))


def run(cfg: Config) -> dict:
    """Pretrain per ``cfg``; returns the summary that rank 0 also writes to ``summary.json``."""
    return drive(cfg, Pretrain())


def codebook_stats_from_counts(counts: torch.Tensor) -> tuple[float, float]:
    """(fraction of the vocabulary used, perplexity) of a token histogram."""
    ids = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    usage, perplexity = codebook_stats(ids, len(counts))
    return float(usage), float(perplexity)


def held_out_batches(run: Run, views, mask_gen, img_size: int):
    """The first ``train.eval_batches`` micro batches of ``data.val_root`` (same on every rank: padded sampler), with
    the tokenizer view ``views`` reads (a tokenizer, or :class:`NoTokenizer`)."""
    cfg, d = run.cfg, run.cfg.data
    transform = EvalTwoView(img_size, views.input_size, mean=d.mean, std=d.std, tokenizer_pixel_map=views.map_pixels)
    val_set = MIMDataset(open_images(d, d.val_root), transform, mask_gen, cfg.run.seed + 1)
    loader = make_loader(val_set, cfg.train.micro_batch, d.num_workers, cfg.run.seed, train=False)
    for i, batch in enumerate(loader):
        if i == cfg.train.eval_batches:
            break
        yield batch


@torch.no_grad()
def evaluate(run: Run, tokenizer, mask_gen, img_size: int) -> dict:
    """Masked-token accuracy on held-out images, beside always guessing the held-out's most frequent token.

    ``tokenizer=None`` (``masking.target=pixels``): the held-out masked-pixel MSE, beside predicting 0 for every
    normalised pixel (each patch's own mean).
    """
    if tokenizer is None:
        return evaluate_pixels(run, mask_gen, img_size)
    correct = torch.zeros((), dtype=torch.long, device=run.device)
    total = torch.zeros_like(correct)
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long, device=run.device)
    run.engine.eval()
    for batch in held_out_batches(run, tokenizer, mask_gen, img_size):
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


@torch.no_grad()
def evaluate_pixels(run: Run, mask_gen, img_size: int) -> dict:
    """Held-out MSE of the masked patches' normalised pixels, beside predicting 0 (a patch's mean) for all."""
    grid = img_size // get_spec(run.cfg.model.name).patch_size
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)  # squared error, squared target, patches
    run.engine.eval()
    for batch in held_out_batches(run, NoTokenizer(grid), mask_gen, img_size):
        out = mim_forward(run.engine, None, batch, run.device, run.dtype)
        n = out.targets.shape[0]
        sums += torch.stack([out.loss.double() * n, out.targets.double().pow(2).mean(-1).sum(),
                             torch.tensor(n, dtype=torch.float64, device=run.device)])
    run.engine.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    error, zero, n = sums.tolist()
    if not n:  # train.eval_batches=0
        return {"eval_masked_patches": 0}
    return {"masked_pixel_loss": error / n, "zero_prediction_pixel_loss": zero / n, "eval_masked_patches": int(n)}
