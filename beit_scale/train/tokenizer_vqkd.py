"""Stage 1, BEiT v2: train a VQ-KD tokenizer (``tokenizer.kind=vqkd``) on the same driver as the dVAE.

The teacher is frozen and stays outside the DeepSpeed engine (on every rank, in the engine's dtype): each micro
step it turns the tokenizer view into the patch features the engine's decoder must predict. The file written at
the end holds the labelling half only (encoder, projection, codebook); the evaluation reads it back, as pretraining
will, and measures codebook usage, perplexity and the cosine feature loss on held-out images.
"""
from __future__ import annotations

import logging

import torch

from beit_scale.adapters import vqkd_arch_kwargs
from beit_scale.checkpoint.gather import full_state_dict
from beit_scale.checkpoint.tokenizer_file import load_tokenizer, save_tokenizer
from beit_scale.config import Config
from beit_scale.data import EvalTwoView, MIMDataset, open_images
from beit_scale.data.fast_views import finish_batch
from beit_scale.models.teacher import FeatureTeacher, check_teacher_grid, load_teacher
from beit_scale.tokenizers import VQKD, VQKDArch, VQKDTokenizer, codebook_stats
from beit_scale.train.driver import MicroStep, Run
from beit_scale.train.tokenizer import TrainTokenizer

log = logging.getLogger(__name__)


def build_vqkd(cfg: Config, teacher_dim: int) -> VQKD:
    """The VQ-KD training model of ``cfg.tokenizer`` for a teacher with ``teacher_dim``-wide features."""
    t = cfg.tokenizer
    return VQKD(VQKDArch(**vqkd_arch_kwargs(cfg)), teacher_dim, t.decoder_depth, t.ema_decay, t.dead_code_steps,
                t.commitment_weight)


class TrainVQKD(TrainTokenizer):
    """VQ-KD on the driver: the teacher's features as targets, codebook statistics of the last step.

    Shares the dVAE task's training views (``train_set``: the tokenizer view only); no temperature, no pictures.
    """

    def build(self, run: Run):
        cfg, t = run.cfg, run.cfg.tokenizer
        self.teacher = load_teacher(t.teacher, t.teacher_timm_name, cfg.data.mean, cfg.data.std)
        check_teacher_grid(self.teacher.spec, VQKDArch(**vqkd_arch_kwargs(cfg)).grid_size, t.input_size)
        self.model = build_vqkd(cfg, self.teacher.feature_dim)
        return self.model, None

    def describe(self, run: Run) -> str:
        t, m = run.cfg.tokenizer, self.model
        trained = sum(p.numel() for p in m.parameters()) / 1e6
        return (f"training a VQ-KD tokenizer (vocab {t.vocab_size} x {t.codebook_dim}, {t.input_size} px, "
                f"{m.arch.grid_size}x{m.arch.grid_size} tokens, {trained:.2f}M parameters; teacher "
                f"{self.teacher.spec.name}, {self.teacher.feature_dim}-dim features)")

    def start(self, run: Run) -> None:
        self.teacher.to(run.device, run.dtype)

    def begin_step(self, run: Run, step: int) -> None:
        pass

    def micro_step(self, run: Run, batch: dict, step: int) -> MicroStep:
        views = finish_batch(batch, self.view_transform, run.device)["tokenizer_view"].to(run.dtype)
        targets = self.teacher(VQKDTokenizer.unmap_pixels(views))  # (B, N, C), no grad
        out = run.engine(views, targets)
        return MicroStep(out.loss, {"feature_loss": out.feature_loss, "commit_loss": out.commit_loss}, out.ids)

    def step_done(self, run: Run, step: int, kept: list) -> None:
        self.ids = kept[-1]

    def log_values(self, run: Run) -> dict[str, float]:
        usage, perplexity = codebook_stats(self.ids, run.cfg.tokenizer.vocab_size)
        return {"codebook_usage": float(usage), "perplexity": float(perplexity)}

    def after_step(self, run: Run, step: int) -> None:
        pass

    def finish(self, run: Run, last: dict) -> dict:
        weights = full_state_dict(run.engine)  # collective under ZeRO-3
        if run.rank != 0:
            return {}  # the driver gives every rank rank 0's summary
        save_tokenizer(self.model, weights, run.layout.tokenizer)
        model = build_vqkd(run.cfg, self.teacher.feature_dim)
        model.load_state_dict(weights)
        summary = evaluate_vqkd(load_tokenizer(run.layout.tokenizer), model, self.teacher, run.cfg, run.device)
        log.info("wrote %s (point a pretraining recipe at it with tokenizer.path=%s)", run.layout.tokenizer,
                 run.layout.tokenizer)
        return summary


@torch.no_grad()
def evaluate_vqkd(tokenizer: VQKDTokenizer, model: VQKD, teacher: FeatureTeacher, cfg: Config,
                  device: torch.device) -> dict:
    """Codebook usage and perplexity of ``tokenizer`` (the file pretraining loads) and the cosine feature loss of
    ``model`` (its decoder) on held-out (else training) images."""
    d, t = cfg.data, cfg.tokenizer
    transform = EvalTwoView(t.input_size, t.input_size, tokenizer_pixel_map=tokenizer.map_pixels)
    dataset = MIMDataset(open_images(d, d.val_root or d.root), transform, None, cfg.run.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.micro_batch, num_workers=d.num_workers)
    tokenizer, model = tokenizer.to(device), model.to(device).eval()
    dtype = next(teacher.parameters()).dtype
    ids, losses = [], []
    for i, batch in enumerate(loader):
        if i == cfg.train.eval_batches:
            break
        views = batch["tokenizer_view"].to(device)
        targets = teacher(VQKDTokenizer.unmap_pixels(views).to(dtype)).float()
        ids.append(tokenizer.encode(views).flatten())
        losses.append(model(views, targets).feature_loss)
    usage, perplexity = codebook_stats(torch.cat(ids), tokenizer.vocab_size)
    return {"tokenizer_kind": "vqkd", "tokenizer_codebook_usage": float(usage),
            "tokenizer_perplexity": float(perplexity), "tokenizer_feature_loss": float(torch.stack(losses).mean()),
            "vocab_size": tokenizer.vocab_size, "eval_images": sum(len(x) for x in ids) // (tokenizer.grid_size ** 2)}
