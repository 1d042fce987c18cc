"""Weights in and out of fine-tuning: where a run's initial weights come from, the files it adds, timm export.

A fine-tuning source (``finetune.init_from``, ``beit-scale export SOURCE``) is one of

* a ``.safetensors`` weights file (``model.safetensors`` of a pretraining or fine-tuning run, the output of
  ``beit-scale consolidate``); nothing else is read from a file path, so no outside pickle is ever loaded;
* a run folder: its ``model.safetensors`` when the run finished, else its newest complete checkpoint;
* a checkpoint step folder (or a run's ``checkpoints`` folder): its ZeRO shards are consolidated in memory after
  the checks ``beit-scale consolidate`` makes (every file matches the manifest, every pickle passes the
  weights-only unpickler).

:func:`describe_source` reads only metadata (cheap, used by the config checks); :func:`load_source` reads the
tensors. Classifier files carry their lineage tag (``run.name``: pt22k_ft22k, ...) in the metadata.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from beit_scale.checkpoint.files import meta_file, rank_state_file, read_manifest, tag_of
from beit_scale.checkpoint.layout import RunLayout
from beit_scale.checkpoint.tools import consolidated_state, resolve_checkpoint
from beit_scale.checkpoint.weights import save_weights

log = logging.getLogger(__name__)

MIM_FORMAT = "beit_scale.mim.v1"  # written by `beit-scale pretrain`
CLASSIFIER_FORMAT = "beit_scale.classifier.v1"  # written by `beit-scale finetune`
PROBE_FORMAT = "beit_scale.linprobe.v1"  # written by `beit-scale linprobe` (norm and head only)
TIMM_FORMAT = "timm"  # written by `beit-scale export`


@dataclass(frozen=True)
class WeightsSource:
    """What a fine-tuning source is, from its metadata only."""

    path: Path  # the weights file or checkpoint step folder that will be read
    kind: Literal["weights", "checkpoint"]
    model: Optional[str]  # zoo name it was trained as, where recorded
    lineage: Optional[str]  # run.name of the run that produced it (pt22k, pt22k_ft22k, ...), where recorded
    zero_stage: Optional[int] = None  # checkpoints only


def _run_config(folder: Path) -> dict:
    path = RunLayout(folder).config
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def describe_source(path: str | Path, what: str = "finetune.init_from") -> WeightsSource:
    """Resolve a run folder, checkpoint folder or ``.safetensors`` file without reading tensors.

    Raises:
        ValueError: nothing there, a file that is not safetensors, or a folder without weights or a complete
            checkpoint.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{what}={str(path)!r}: only .safetensors weights are read (never pickles); point it at a "
                             "run folder or a checkpoint folder, or convert with `beit-scale consolidate`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # safetensors raises its own types for malformed headers
            raise ValueError(f"{what}={str(path)!r} is not a readable safetensors file: {err}") from None
        return WeightsSource(path, "weights", meta.get("model") or None, meta.get("lineage") or None)
    if not path.is_dir():
        raise ValueError(f"{what}={str(path)!r}: no such file or folder")
    layout = RunLayout(path)
    if layout.model.is_file():  # a finished run: its final weights, written after its last checkpoint
        source = describe_source(layout.model, what)
        run = _run_config(path).get("run", {})
        return WeightsSource(source.path, "weights", source.model, source.lineage or run.get("name"))
    try:
        ckpt = resolve_checkpoint(path)
    except ValueError:
        raise ValueError(f"{what}={str(path)!r} holds neither {layout.model.name} nor a complete checkpoint") from None
    if read_manifest(ckpt) is None or not meta_file(ckpt).is_file():
        raise ValueError(f"{what}={str(path)!r}: checkpoint {ckpt} is incomplete (no manifest or meta file)")
    meta = json.loads(meta_file(ckpt).read_text())
    cfg = meta.get("config", {})
    return WeightsSource(ckpt, "checkpoint", cfg.get("model", {}).get("name"), cfg.get("run", {}).get("name"),
                         meta.get("zero_stage"))


def load_source(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The fp32 state dict of a source (see the module docstring); collective-free, call it on one rank."""
    if source.kind == "weights":
        return {k: v.float() for k, v in load_file(str(source.path)).items()}
    return consolidated_state(source.path)


def init_weights_file(layout: RunLayout) -> Path:
    """A checkpoint source consolidated once by rank 0, which every rank then reads (safetensors, mmap)."""
    return layout.root / "init_weights.safetensors"


def ema_weights_file(layout: RunLayout) -> Path:
    """Final EMA weights of a fine-tuning run (``finetune.ema_decay`` > 0), beside ``model.safetensors``."""
    return layout.root / "model_ema.safetensors"


def materialize_source(source: WeightsSource, layout: RunLayout, rank: int) -> Path:
    """A safetensors file every rank can read: the source itself, or (rank 0) its consolidation into the run folder.

    Callers barrier between this and reading the file on other ranks.
    """
    if source.kind == "weights":
        return source.path
    out = init_weights_file(layout)
    if rank == 0:
        save_weights(load_source(source), out, {"format": "beit_scale.consolidated.v1", "model": source.model or "",
                                                "lineage": source.lineage or "", "source": str(source.path)})
    return out


def checkpoint_rank0_state(layout: RunLayout, step: int) -> dict:
    """Rank 0's per-rank state saved with the checkpoint of ``step`` (read weights-only), e.g. for EMA weights."""
    return torch.load(rank_state_file(layout.checkpoints / tag_of(step), 0), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------- timm export


def _img_size_of(sd: dict[str, torch.Tensor], patch_size: int) -> int:
    """Resolution (px) the relative position tables of ``sd`` were made for: table rows = (2w-1)^2 + 3."""
    tables = [v for k, v in sd.items() if k.endswith("relative_position_bias_table")]
    if not tables:
        raise ValueError("the source has no relative position tables; it is not a BEiT state dict of this zoo")
    table = tables[0]
    side = math.isqrt(max(table.shape[0] - 3, 0))
    if table.ndim != 2 or side < 1 or side * side != table.shape[0] - 3 or side % 2 == 0:
        raise ValueError(f"the source's relative position table has shape {tuple(table.shape)}; a BEiT table is "
                         "((2w-1)^2 + 3, heads) for a w x w patch grid: the file is damaged or not a BEiT state dict")
    return (side + 1) // 2 * patch_size


def timm_state_dict(sd: dict[str, torch.Tensor], model_name: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Our pretraining or classifier state dict as timm's ``Beit`` state dict.

    Returns:
        (state dict, num_classes for ``timm.create_model`` (0 for a pretraining source), img_size in px).
    """
    from beit_scale.models import get_spec, mim_to_timm_backbone, to_timm_state_dict
    from beit_scale.models.convert import SHARED_TABLE

    spec = get_spec(model_name)
    img_size = _img_size_of(sd, spec.patch_size)
    if SHARED_TABLE in sd or "lm_head.weight" in sd or "pixel_head.weight" in sd:
        return mim_to_timm_backbone(sd, spec, img_size), 0, img_size
    if "head.weight" not in sd:
        raise ValueError("the source is neither a BEiT pretraining nor a classifier state dict (no lm_head, "
                         "pixel_head or head)")
    return to_timm_state_dict(sd), sd["head.weight"].shape[0], img_size


def check_loads_in_timm(sd: dict[str, torch.Tensor], timm_name: str, num_classes: int, img_size: int) -> None:
    """Load ``sd`` strictly into ``timm.create_model(timm_name, num_classes=..., img_size=...)`` built on meta."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, img_size=img_size)
    except RuntimeError as err:  # timm: "Unknown model"
        raise ValueError(f"--timm-name {timm_name!r}: {err}") from None
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        text = text if len(text) <= 600 else text[:600] + f" ... ({len(text) - 600} more characters)"
        raise ValueError(f"the exported weights do not load strictly into timm's {timm_name} (num_classes="
                         f"{num_classes}, img_size={img_size}): {text}") from None


def export_for_timm(source_path: str | Path, out: str | Path, timm_name: Optional[str] = None,
                    model_name: Optional[str] = None) -> dict:
    """`beit-scale export`: a source as safetensors that load strictly into timm's ``Beit``.

    A classifier loads into ``timm.create_model(name, num_classes=N)``, a pretraining source into
    ``num_classes=0`` (mean pooling and a fresh ``fc_norm``, where BEiT fine-tuning starts). The strict load is
    checked on the meta device for ``timm_name``, by default the source's zoo name where timm registers it.
    """
    import timm

    source = describe_source(source_path, "export source")
    model_name = model_name or source.model
    if not model_name:
        raise ValueError(f"{source.path} does not record its zoo model; pass --model, e.g. beit_base_patch16_224")
    sd, num_classes, img_size = timm_state_dict(load_source(source), model_name)
    timm_name = timm_name or (model_name if model_name in timm.list_models("beit*") else None)
    if timm_name:
        check_loads_in_timm(sd, timm_name, num_classes, img_size)
    else:
        log.warning("timm has no %s; pass --timm-name to check the strict load into a timm entry", model_name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": TIMM_FORMAT, "timm_name": timm_name or "", "model": model_name, "num_classes": str(num_classes),
            "img_size": str(img_size), "lineage": source.lineage or "", "source": str(source.path)}
    save_weights(sd, out, meta)
    log.info("wrote %s: %d tensors for timm %s (num_classes=%d, img_size=%d)", out, len(sd), timm_name or model_name,
             num_classes, img_size)
    return {**meta, "out": str(out), "tensors": len(sd)}
