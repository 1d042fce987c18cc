"""`beit-scale quickstart`: the whole method on real images in minutes on a laptop-class CPU.

Finds Fashion-MNIST (a folder the user names, Debian's dataset-fashion-mnist, or torchvision's download), exports
the quickstart recipe's share of it to ImageFolder, trains a small dVAE tokenizer, then pretrains a tiny BEiT
with MIM, and writes ``summary.json`` beside both runs. Sizes and steps come from the recipes
(``recipes/quickstart/*.yaml`` and the two stage recipes they name).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from beit_scale.checkpoint import RunLayout
from beit_scale.checks import validate
from beit_scale.config import Config, load_config, load_quickstart
from beit_scale.data import export_fashion_mnist, find_fashion_mnist
from beit_scale.engine.dist import launched_world_size
from beit_scale.train import pretrain, tokenizer

log = logging.getLogger(__name__)


def _stage(recipe: str, job: str, overrides: list[str]) -> Config:
    cfg = load_config(recipe, overrides)
    if cfg.run.job != job:
        raise ValueError(f"quickstart stage recipe {recipe!r} has run.job={cfg.run.job!r}; it must be a {job} recipe")
    return cfg


def run(recipe: str = "default", output_dir: str = "runs/quickstart", data_dir: str | None = None,
        overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Run the quickstart recipe into ``output_dir``; returns (and writes) its summary."""
    if launched_world_size() != 1:
        raise ValueError("quickstart runs as one process; for several ranks use `beit-scale pretrain` under torchrun")
    qs = load_quickstart(recipe, overrides)
    out = RunLayout(Path(output_dir))
    tok_dir, pt_dir = out.root / "tokenizer", out.root / "pretrain"
    # Both stage recipes are read before anything runs; stage 2's tokenizer file is checked once stage 1 wrote it.
    data_paths = [f"data.root={out.root / 'data' / 'train'}", f"data.val_root={out.root / 'data' / 'test'}"]
    tok_cfg = _stage(qs.tokenizer, "tokenizer", [f"run.output_dir={tok_dir}", *data_paths])
    pt_cfg = _stage(qs.pretrain, "pretrain", [f"run.output_dir={pt_dir}",
                                              f"tokenizer.path={RunLayout(tok_dir).tokenizer}", *data_paths])
    start = time.monotonic()
    source = find_fashion_mnist(Path(data_dir) if data_dir else None, out.root / "data" / "download")
    train_root = export_fashion_mnist(out.root / "data", "train", limit=qs.train_images, source_dir=source)
    val_root = export_fashion_mnist(out.root / "data", "test", limit=qs.heldout_images, source_dir=source)
    log.info("Fashion-MNIST: %d training images in %s, %d held-out in %s",
             qs.train_images, train_root, qs.heldout_images, val_root)

    wall_s = {"data": time.monotonic() - start}

    validate(tok_cfg, 1)
    log.info("stage 1/2: tokenizer (%s)", qs.tokenizer)
    tok_summary = tokenizer.run(tok_cfg)
    wall_s["tokenizer"] = time.monotonic() - start - sum(wall_s.values())
    validate(pt_cfg, 1)
    log.info("stage 2/2: masked image modeling (%s)", qs.pretrain)
    pt_summary = pretrain.run(pt_cfg)
    wall_s["pretrain"] = time.monotonic() - start - sum(wall_s.values())
    wall_s["total"] = time.monotonic() - start

    summary = {
        "recipe": recipe,
        "final_loss": pt_summary["final_loss"],
        "masked_token_accuracy": pt_summary["masked_token_accuracy"],
        "majority_token_accuracy": pt_summary["majority_token_accuracy"],
        "tokenizer_codebook_usage": tok_summary.get("tokenizer_codebook_usage"),
        "tokenizer_perplexity": tok_summary.get("tokenizer_perplexity"),
        "images_per_second": pt_summary["images_per_second"],
        "tokenizer_images_per_second": tok_summary.get("images_per_second"),
        "train_images": qs.train_images,
        "heldout_images": qs.heldout_images,
        "heldout_masked_tokens": pt_summary["eval_masked_tokens"],
        "fashion_mnist_source": str(source),
        "wall_s": {k: round(v, 1) for k, v in wall_s.items()},
    }
    out.summary.write_text(json.dumps(summary, indent=2))
    log.info("quickstart done in %.0f s: masked-token accuracy %.3f vs majority baseline %.3f; summary in %s",
             wall_s["total"], summary["masked_token_accuracy"], summary["majority_token_accuracy"], out.summary)
    return summary
