"""Merge a DeepSpeed JSON (ZeRO, offload, precision, buckets) with what the run config owns.

Plain JSON handling; importing this module does not import DeepSpeed, so configs are checked before any
process group starts.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from beit_scale.config import Config, resolve_project_path

# Keys the recipe owns; a ds_config that sets them clashes with the recipe.
RECIPE_OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "optimizer": "optim.*",
    "scheduler": "optim.warmup_steps and train.total_steps",
    "gradient_clipping": "optim.clip_grad",
}


def load_ds_config(path_str: str) -> dict:
    """Read a ds_config and reject keys the recipe owns or precisions we do not run."""
    path = resolve_project_path(path_str)
    if not path.is_file():
        raise ValueError(f"engine.ds_config={path_str!r}: no such file (looked at {path})")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"engine.ds_config={path_str!r} is not valid JSON: {err}") from None
    clashes = sorted(set(ds) & set(RECIPE_OWNED))
    if clashes:
        owners = ", ".join(f"{k} (set {RECIPE_OWNED[k]} in the recipe)" for k in clashes)
        raise ValueError(f"engine.ds_config={path_str!r} sets keys the recipe owns: {owners}; remove them from the JSON")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ValueError(f"engine.ds_config={path_str!r} enables both fp16 and bf16; keep one")
    return ds


def precision_of(ds: dict) -> str:
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "bf16" if ds.get("bf16", {}).get("enabled") else "fp32"


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """The full DeepSpeed config for this run: the ds_config file plus batch, clipping and overrides."""
    ds = copy.deepcopy(load_ds_config(cfg.engine.ds_config))
    if cfg.engine.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.engine.zero_stage
    if cfg.engine.precision is not None:
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.engine.precision == "bf16"}
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.engine.precision == "fp16"}
    if precision_of(ds) == "fp16":
        # DeepSpeed's dynamic loss scaling (loss_scale 0): an overflow skips the step on every rank and halves
        # the scale; 2^16 to start, doubled after 1000 clean steps, as DeepSpeed's own defaults.
        ds["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                      "min_loss_scale": 1, **ds["fp16"]}
    t = cfg.train
    ds.update(
        train_batch_size=t.global_batch,
        train_micro_batch_size_per_gpu=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        gradient_clipping=cfg.optim.clip_grad,  # DeepSpeed's default is 1.0: always set it
        # The optimizer is a client torch AdamW built from the recipe.
        zero_allow_untested_optimizer=True,
    )
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    # DeepSpeed's throughput timer synchronizes the device at every forward and step; we time ourselves.
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    if precision_of(ds) in ("bf16", "fp16"):
        # DeepSpeed casts parameters, not buffers; timm's Beit keeps k_bias as an fp32 buffer, which makes
        # the q/k/v linear mix dtypes. Cast float buffers too (integer index buffers are left alone).
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", precision_of(ds))
    assert t.global_batch == t.micro_batch * t.grad_accum * world_size, "validate() checks this first"
    return ds


def write_ds_config(ds: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds, indent=2))
