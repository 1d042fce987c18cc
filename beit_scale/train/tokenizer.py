"""Stage 1: train the discrete VAE tokenizer (Gumbel-softmax, uniform prior) on the same engine code."""
from __future__ import annotations

import json
import logging

import torch
import torch.distributed as dist

from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint import faults
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.tokenizer_file import load_tokenizer, save_tokenizer
from beit_scale.checks import tokenizer_arch_kwargs
from beit_scale.config import Config
from beit_scale.data import EvalTwoView, MIMDataset, SafeImageFolder, TwoViewTransform
from beit_scale.engine.core import guarded_step
from beit_scale.engine.dist import init_distributed
from beit_scale.tokenizers import DiscreteVAE, DVAEArch, codebook_stats, gumbel_temperature
from beit_scale.train.common import (make_loader, seed_everything, skip_nonfinite_step,
                                    start_engine, start_loop)
from beit_scale.train.images import save_reconstructions

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    """Train a tokenizer per ``cfg``; writes ``tokenizer.safetensors``, reconstructions and ``summary.json``."""
    info = init_distributed()
    seed_everything(cfg.run.seed)
    t = cfg.tokenizer
    model = DiscreteVAE(DVAEArch(**tokenizer_arch_kwargs(cfg)))
    layout, engine, schedule, dtype = start_engine(cfg, model, info)
    log.info("training a dVAE tokenizer (vocab %d, %d px, %dx%d tokens, %.2fM parameters) on %d rank(s), %s",
             t.vocab_size, t.input_size, model.grid_size, model.grid_size,
             sum(p.numel() for p in model.parameters()) / 1e6, info.world_size, dtype)

    d = cfg.data
    # The tokenizer reads only its own view; the patch view is made at the same size and ignored.
    transform = TwoViewTransform(t.input_size, t.input_size, scale=d.crop_scale, hflip=d.hflip,
                                 color_jitter=d.color_jitter, tokenizer_pixel_map=model.map_pixels)
    loader = make_loader(MIMDataset(SafeImageFolder(d.root), transform, None, cfg.run.seed),
                         cfg.train.micro_batch, d.num_workers, cfg.run.seed, train=True)
    loop = start_loop(cfg, layout, info, engine, loader)
    state, batches, writer, meter, trace = (loop.state, loop.batches, loop.writer, loop.meter,
                                            loop.trace)
    anneal_steps = max(1, round(t.anneal_fraction * cfg.train.total_steps))

    engine.train()
    while state.step < cfg.train.total_steps:
        step = state.step
        schedule.apply(step)
        temperature = gumbel_temperature(step, anneal_steps, t.temperature_start, t.temperature_end)
        outs = []
        for _ in range(cfg.train.grad_accum):
            batch = next(batches)
            trace.add(step + 1, batch["index"])
            views = batch["tokenizer_view"].to(info.device, dtype, non_blocking=True)
            out = engine(views, temperature, t.kl_weight)
            engine.backward(faults.poison(out.loss, step + 1, info.rank))
            applied = guarded_step(engine)
            outs.append(out)
        if not applied:  # DeepSpeed decides at the boundary, the same on every rank
            skip_nonfinite_step(state, cfg, layout)
            continue
        for out in outs:
            meter.add(loss=out.loss, recon_loss=out.recon_loss, kl=out.kl)
        state.consecutive_skips = 0
        state.step = step + 1
        meter.step_done()
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.total_steps:
            usage, perplexity = codebook_stats(out.logits.argmax(1).flatten(), t.vocab_size)
            meter.flush(step, temperature=temperature, lr=engine.optimizer.param_groups[0]["lr"],
                        codebook_usage=float(usage), perplexity=float(perplexity))
        if t.recon_every and state.step % t.recon_every == 0:
            _write_reconstructions(engine, layout, views, writer, state.step, info.rank)
        loop.end_step(engine)

    images_per_second = meter.images_per_second
    weights = full_state_dict(engine)  # collective under ZeRO-3
    summary = {}
    if info.rank == 0:
        save_tokenizer(model, weights, layout.tokenizer)
        # Evaluate the file we wrote, so the numbers describe what pretraining will load.
        tokenizer = load_tokenizer(layout.tokenizer)
        summary = evaluate_tokenizer(tokenizer, cfg, layout, writer)
        summary["images_per_second"] = images_per_second
        layout.summary.write_text(json.dumps(summary, indent=2))
        log.info("tokenizer summary: %s", json.dumps(summary))
        log.info("wrote %s (point a pretraining recipe at it with tokenizer.path=%s)", layout.tokenizer, layout.tokenizer)
    loop.close()
    if dist.is_initialized():
        dist.barrier()
    return summary


def _write_reconstructions(engine, layout: RunLayout, views: torch.Tensor, writer, step: int, rank: int) -> None:
    """Soft (Gumbel) reconstructions during training, from the engine's own forward (works under ZeRO-3)."""
    with torch.no_grad():
        out = engine(views[:8], 1e-3, 0.0)  # near-zero temperature: close to the hard-token decode
    if rank == 0:
        unmap = DiscreteVAE.unmap_pixels
        save_reconstructions(unmap(views[:8].float()), unmap(out.recon.float()),
                             layout.images / f"recon_step{step:07d}.png", writer, step)


@torch.no_grad()
def evaluate_tokenizer(tokenizer: DiscreteVAE, cfg: Config, layout: RunLayout, writer) -> dict:
    """Codebook usage, perplexity and hard-token reconstruction error on held-out (else training) images."""
    d, t = cfg.data, cfg.tokenizer
    transform = EvalTwoView(t.input_size, t.input_size, tokenizer_pixel_map=tokenizer.map_pixels)
    dataset = MIMDataset(SafeImageFolder(d.val_root or d.root), transform, None, cfg.run.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.micro_batch, num_workers=d.num_workers)
    ids, errors = [], []
    for i, batch in enumerate(loader):
        if i == cfg.train.eval_batches:
            break
        views = batch["tokenizer_view"]
        tokens = tokenizer.encode(views)  # (B, h*w)
        recon = tokenizer.decode_ids(tokens)
        errors.append(((recon - views) ** 2).mean())
        ids.append(tokens.flatten())
        if i == 0:
            unmap = DiscreteVAE.unmap_pixels
            save_reconstructions(unmap(views[:8]), unmap(recon[:8]), layout.images / "reconstructions.png",
                                 writer, cfg.train.total_steps)
    usage, perplexity = codebook_stats(torch.cat(ids), tokenizer.vocab_size)
    return {"tokenizer_codebook_usage": float(usage), "tokenizer_perplexity": float(perplexity),
            "tokenizer_recon_mse": float(torch.stack(errors).mean()), "vocab_size": tokenizer.vocab_size,
            "eval_images": sum(len(x) for x in ids) // (tokenizer.grid_size ** 2)}
