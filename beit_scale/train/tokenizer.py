"""Stage 1: train the discrete VAE tokenizer (Gumbel-softmax, uniform prior) on the same driver; VQ-KD (BEiT v2,
``tokenizer.kind=vqkd``) is in tokenizer_vqkd.py."""
from __future__ import annotations

import logging

import torch

from beit_scale.adapters import tokenizer_arch_kwargs
from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.tokenizer_file import load_tokenizer, save_tokenizer
from beit_scale.config import Config
from beit_scale.data import EvalTwoView, MIMDataset, open_images
from beit_scale.data.fast_views import finish_batch, takes_arrays, two_view_transform
from beit_scale.tokenizers import DiscreteVAE, DVAEArch, codebook_stats, gumbel_temperature
from beit_scale.train.driver import MicroStep, Run, Task, drive
from beit_scale.train.images import save_reconstructions

log = logging.getLogger(__name__)


class TrainTokenizer(Task):
    """The dVAE on the driver: Gumbel temperature annealed per step, codebook statistics, reconstructions."""

    def build(self, run: Run):
        self.model = DiscreteVAE(DVAEArch(**tokenizer_arch_kwargs(run.cfg)))
        self.anneal_steps = max(1, round(run.cfg.tokenizer.anneal_fraction * run.cfg.train.total_steps))
        return self.model, None

    def describe(self, run: Run) -> str:
        t, m = run.cfg.tokenizer, self.model
        return (f"training a dVAE tokenizer (vocab {t.vocab_size}, {t.input_size} px, {m.grid_size}x{m.grid_size} "
                f"tokens, {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters)")

    def train_set(self, run: Run) -> MIMDataset:
        d, t = run.cfg.data, run.cfg.tokenizer
        # The tokenizer reads only its own view; the patch view is made at the same size and ignored.
        self.view_transform = two_view_transform(d.transform, t.input_size, t.input_size, scale=d.crop_scale,
                                                 hflip=d.hflip, color_jitter=d.color_jitter,
                                                 tokenizer_pixel_map=self.model.map_pixels)
        images = open_images(d, d.root, arrays=takes_arrays(self.view_transform))
        return MIMDataset(images, self.view_transform, None, run.cfg.run.seed)

    def begin_step(self, run: Run, step: int) -> None:
        t = run.cfg.tokenizer
        self.temperature = gumbel_temperature(step, self.anneal_steps, t.temperature_start, t.temperature_end)

    def micro_step(self, run: Run, batch: dict, step: int) -> MicroStep:
        views = finish_batch(batch, self.view_transform, run.device)["tokenizer_view"].to(run.dtype)
        out = run.engine(views, self.temperature, run.cfg.tokenizer.kl_weight)
        return MicroStep(out.loss, {"recon_loss": out.recon_loss, "kl": out.kl}, (out.logits, views))

    def step_done(self, run: Run, step: int, kept: list) -> None:
        self.logits, self.views = kept[-1]

    def log_values(self, run: Run) -> dict[str, float]:
        usage, perplexity = codebook_stats(self.logits.argmax(1).flatten(), run.cfg.tokenizer.vocab_size)
        return {"temperature": self.temperature, "codebook_usage": float(usage), "perplexity": float(perplexity)}

    def after_step(self, run: Run, step: int) -> None:
        every = run.cfg.tokenizer.recon_every
        if every and step % every == 0:
            _write_reconstructions(run.engine, run.layout, self.views, run.writer, step, run.rank)

    def finish(self, run: Run, last: dict) -> dict:
        weights = full_state_dict(run.engine)  # collective under ZeRO-3
        if run.rank != 0:
            return {}  # the driver gives every rank rank 0's summary
        save_tokenizer(self.model, weights, run.layout.tokenizer)
        # Evaluate the file we wrote, so the numbers describe what pretraining will load.
        summary = evaluate_tokenizer(load_tokenizer(run.layout.tokenizer), run.cfg, run.layout, run.writer)
        log.info("wrote %s (point a pretraining recipe at it with tokenizer.path=%s)", run.layout.tokenizer,
                 run.layout.tokenizer)
        return summary


def run(cfg: Config) -> dict:
    """Train a tokenizer per ``cfg`` (``tokenizer.kind``: dvae or vqkd); writes ``tokenizer.safetensors``, the
    dVAE's reconstructions and ``summary.json``."""
    if cfg.tokenizer.kind == "vqkd":
        from beit_scale.train.tokenizer_vqkd import TrainVQKD

        return drive(cfg, TrainVQKD())
    return drive(cfg, TrainTokenizer())


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
    dataset = MIMDataset(open_images(d, d.val_root or d.root), transform, None, cfg.run.seed)
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
