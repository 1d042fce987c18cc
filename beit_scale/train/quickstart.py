"""`beit-scale quickstart`: the whole method on real images in minutes on a laptop-class CPU.

Exports Fashion-MNIST (Debian's dataset-fashion-mnist) to ImageFolder, trains a small dVAE tokenizer, then
pretrains a tiny BEiT with MIM, and writes ``summary.json`` beside both runs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from beit_scale.checkpoint import RunLayout
from beit_scale.checks import validate
from beit_scale.config import load_config
from beit_scale.data import export_fashion_mnist
from beit_scale.engine.dist import launched_world_size
from beit_scale.train import pretrain, tokenizer

log = logging.getLogger(__name__)


def run(output_dir: str, images: int | None = None) -> dict:
    if launched_world_size() != 1:
        raise ValueError("quickstart runs as one process; for several ranks use `beit-scale pretrain` under torchrun")
    out = RunLayout(Path(output_dir)).make()
    train_limit = images or 12000
    train_root = export_fashion_mnist(out.root / "data", "train", limit=train_limit)
    val_root = export_fashion_mnist(out.root / "data", "test", limit=1024)
    log.info("Fashion-MNIST: %d training images in %s, 1024 held-out in %s", train_limit, train_root, val_root)
    data = [f"data.root={train_root}", f"data.val_root={val_root}"]

    tok_dir = out.root / "tokenizer"
    tok_cfg = load_config("quickstart_tokenizer", [f"run.output_dir={tok_dir}", *data])
    pt_cfg_overrides = [f"run.output_dir={out.root / 'pretrain'}",
                        f"tokenizer.path={RunLayout(tok_dir).tokenizer}", *data]
    validate(tok_cfg, 1)
    log.info("stage 1/2: tokenizer")
    tok_summary = tokenizer.run(tok_cfg)

    pt_cfg = load_config("quickstart_pretrain", pt_cfg_overrides)
    validate(pt_cfg, 1)
    log.info("stage 2/2: masked image modeling")
    pt_summary = pretrain.run(pt_cfg)

    summary = {
        "final_loss": pt_summary["final_loss"],
        "masked_token_accuracy": pt_summary["masked_token_accuracy"],
        "majority_token_accuracy": pt_summary["majority_token_accuracy"],
        "tokenizer_codebook_usage": tok_summary.get("tokenizer_codebook_usage"),
        "tokenizer_perplexity": tok_summary.get("tokenizer_perplexity"),
        "images_per_second": pt_summary["images_per_second"],
        "tokenizer_images_per_second": tok_summary.get("images_per_second"),
        "train_images": train_limit,
        "heldout_masked_tokens": pt_summary["eval_masked_tokens"],
    }
    out.summary.write_text(json.dumps(summary, indent=2))
    log.info("quickstart done: masked-token accuracy %.3f vs majority baseline %.3f; summary in %s",
             summary["masked_token_accuracy"], summary["majority_token_accuracy"], out.summary)
    return summary
