"""Stage 2: masked image modeling. The tokenizer labels masked patches; BEiT predicts them."""
from __future__ import annotations

import json
import logging
from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from beit_scale.checkpoint import faults
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.tokenizer_file import load_tokenizer
from beit_scale.checkpoint.weights import save_weights
from beit_scale.checks import patch_grid
from beit_scale.config import Config
from beit_scale.data import EvalTwoView, MIMDataset, SafeImageFolder, TwoViewTransform
from beit_scale.engine.core import guarded_step
from beit_scale.engine.dist import init_distributed
from beit_scale.masking import build_mask_generator
from beit_scale.models import build_mim_model, masked_positions
from beit_scale.tokenizers import codebook_stats
from beit_scale.train.common import (make_loader, seed_everything, skip_nonfinite_step,
                                    start_engine, start_loop)
from beit_scale.train.images import save_mask_grid

log = logging.getLogger(__name__)


def to_device(batch: dict, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, tokenizer views, mask, flat masked indices) on the device; indices found on the CPU (no sync)."""
    masked_idx = masked_positions(batch["mask"])  # (n_masked,)
    return (batch["image"].to(device, dtype, non_blocking=True),
            batch["tokenizer_view"].to(device, non_blocking=True),
            batch["mask"].to(device, non_blocking=True),  # (B, N) bool
            masked_idx.to(device, non_blocking=True))


class StepResult(NamedTuple):
    loss: torch.Tensor  # 0-dim, on the device
    accuracy: torch.Tensor  # masked-token accuracy of the micro batch
    targets: torch.Tensor  # (n_masked,) visual tokens
    applied: bool  # False when the optimizer step was skipped for a non-finite loss or gradient


def pretrain_step(engine, tokenizer, batch: dict, device, dtype, loss_hook=None) -> StepResult:
    """One micro step: label masked patches with the tokenizer, predict them, backward, step."""
    images, views, mask, masked_idx = to_device(batch, device, dtype)
    with torch.no_grad():
        targets = tokenizer.encode(views).flatten().index_select(0, masked_idx)  # (n_masked,)
    logits = engine(images, mask, masked_idx)  # (n_masked, vocab)
    loss = F.cross_entropy(logits.float(), targets)
    if loss_hook is not None:
        loss = loss_hook(loss)
    engine.backward(loss)
    applied = guarded_step(engine)
    return StepResult(loss.detach(), (logits.argmax(-1) == targets).float().mean(), targets, applied)


def run(cfg: Config) -> dict:
    """Pretrain per ``cfg``; returns the summary that rank 0 also writes to ``summary.json``."""
    info = init_distributed()
    seed_everything(cfg.run.seed)
    grid, img_size = patch_grid(cfg)

    tokenizer = load_tokenizer(cfg.tokenizer.path).to(info.device)
    model = build_mim_model(cfg.model, tokenizer.vocab_size)
    layout, engine, schedule, dtype = start_engine(cfg, model, info)
    log.info("pretraining %s (%.2fM parameters) on %d rank(s), %s, ZeRO %d; tokenizer %s (vocab %d)",
             cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, info.world_size, dtype,
             engine.zero_optimization_stage(), cfg.tokenizer.path, tokenizer.vocab_size)

    mask_gen = build_mask_generator(cfg.masking.kind, (grid, grid), cfg.masking.num_masked,
                                    cfg.masking.min_block_patches, cfg.masking.min_aspect)
    d = cfg.data
    transform = TwoViewTransform(img_size, tokenizer.input_size, scale=d.crop_scale, hflip=d.hflip,
                                 color_jitter=d.color_jitter, mean=d.mean, std=d.std,
                                 tokenizer_pixel_map=tokenizer.map_pixels)
    train_set = MIMDataset(SafeImageFolder(d.root), transform, mask_gen, cfg.run.seed)
    loader = make_loader(train_set, cfg.train.micro_batch, d.num_workers, cfg.run.seed, train=True)
    loop = start_loop(cfg, layout, info, engine, loader)
    state, batches, writer, meter, trace = (loop.state, loop.batches, loop.writer, loop.meter,
                                            loop.trace)
    token_counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long, device=info.device)
    last = {"loss": float("nan"), "mask_acc": float("nan")}

    engine.train()
    while state.step < cfg.train.total_steps:
        step = state.step
        schedule.apply(step)
        results = []
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            trace.add(step + 1, batch["index"])
            if step == 0 and info.rank == 0:
                save_mask_grid(batch, d.mean, d.std, layout.images / "masks.png", writer)
            results.append(pretrain_step(engine, tokenizer, batch, info.device, dtype,
                                         partial(faults.poison, step=step + 1, rank=info.rank)))
        if not results[-1].applied:  # DeepSpeed decides at the boundary, the same on every rank
            skip_nonfinite_step(state, cfg, layout)
            continue
        for r in results:
            token_counts.scatter_add_(0, r.targets, torch.ones_like(r.targets))  # bincount would sync
            meter.add(loss=r.loss, mask_acc=r.accuracy)
        state.consecutive_skips = 0
        state.step = step + 1
        meter.step_done()
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.total_steps:
            norm = engine.get_global_grad_norm()
            last = meter.flush(step, lr=engine.optimizer.param_groups[0]["lr"],
                               grad_norm=float("nan") if norm is None else float(norm))
        loop.end_step(engine)

    images_per_second = meter.images_per_second
    weights = full_state_dict(engine)
    if info.rank == 0:
        save_weights(weights, layout.model, {"format": "beit_scale.mim.v1", "model": cfg.model.name})
    summary = {"final_loss": last["loss"], "train_masked_token_accuracy": last["mask_acc"],
               "images_per_second": images_per_second, "steps": cfg.train.total_steps,
               "world_size": info.world_size, "restarts": state.restarts, "skipped_steps": state.skipped_steps}
    if d.val_root:
        summary.update(evaluate(engine, tokenizer, cfg, mask_gen, img_size, info, dtype))
    if dist.is_initialized():
        dist.all_reduce(token_counts)
    usage, perplexity = codebook_stats_from_counts(token_counts)
    summary.update(target_codebook_usage=usage, target_perplexity=perplexity)
    if info.rank == 0:
        layout.summary.write_text(json.dumps(summary, indent=2))
        log.info("summary: %s", json.dumps(summary))
        log.info("wrote %s and %s", layout.summary, layout.model)
    loop.close()
    return summary


def codebook_stats_from_counts(counts: torch.Tensor) -> tuple[float, float]:
    """(fraction of the vocabulary used, perplexity) of a token histogram."""
    ids = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    usage, perplexity = codebook_stats(ids, len(counts))
    return float(usage), float(perplexity)


@torch.no_grad()
def evaluate(engine, tokenizer, cfg: Config, mask_gen, img_size: int, info, dtype) -> dict:
    """Masked-token accuracy on held-out images, beside always guessing the held-out's most frequent token."""
    d = cfg.data
    transform = EvalTwoView(img_size, tokenizer.input_size, mean=d.mean, std=d.std,
                            tokenizer_pixel_map=tokenizer.map_pixels)
    val_set = MIMDataset(SafeImageFolder(d.val_root), transform, mask_gen, cfg.run.seed + 1)
    loader = make_loader(val_set, cfg.train.micro_batch, d.num_workers, cfg.run.seed, train=False)
    correct = torch.zeros((), dtype=torch.long, device=info.device)
    total = torch.zeros_like(correct)
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long, device=info.device)
    engine.eval()
    for i, batch in enumerate(loader):
        if i == cfg.train.eval_batches:  # every rank has the same number of batches (padded sampler)
            break
        images, views, mask, masked_idx = to_device(batch, info.device, dtype)
        targets = tokenizer.encode(views).flatten().index_select(0, masked_idx)
        logits = engine(images, mask, masked_idx)
        correct += (logits.argmax(-1) == targets).sum()
        total += targets.numel()
        counts.scatter_add_(0, targets, torch.ones_like(targets))
    engine.train()
    stats = torch.stack([correct, total])
    if dist.is_initialized():
        dist.all_reduce(stats)
        dist.all_reduce(counts)
    correct_n, total_n = stats.tolist()
    return {"masked_token_accuracy": correct_n / total_n,
            "majority_token_accuracy": counts.max().item() / total_n,
            "eval_masked_tokens": total_n}
