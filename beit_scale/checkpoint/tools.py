"""`beit-scale inspect` and `beit-scale consolidate`: read a checkpoint without a process group."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from beit_scale.checkpoint.files import ManifestError, check_files, committed_tags, meta_file, read_manifest
from beit_scale.checkpoint.layout import RunLayout
from beit_scale.checkpoint.safety import UnsafeCheckpointError, _deepspeed_allowlist, check_unpickle_safe
from beit_scale.checkpoint.weights import save_weights

log = logging.getLogger(__name__)

STAGE0_MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's module file when nothing is partitioned


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder from a step folder, a run's ``checkpoints`` folder or a run folder (newest complete one)."""
    path = Path(path)
    if (path / "manifest.json").is_file() or path.name.startswith("step_"):
        return path
    for root in (path, RunLayout(path).checkpoints):
        tags = committed_tags(root)
        if tags:
            return root / tags[0]
    raise ValueError(f"{path} holds no complete checkpoint (a step_* folder with a manifest.json)")


def inspect(path: str | Path) -> dict:
    """Step, world size, ZeRO stage, dtype, versions, key config, and whether every file matches the manifest."""
    ckpt = resolve_checkpoint(path)
    try:
        manifest = read_manifest(ckpt)
        problems = [str(p) for p in check_files(ckpt, manifest["files"])] if manifest else []
        if manifest is None:
            problems.append("no manifest: the save did not finish")
    except ManifestError as err:
        manifest, problems = None, [str(err)]
    try:
        meta = json.loads(meta_file(ckpt).read_text()) if meta_file(ckpt).is_file() else {}
    except (OSError, ValueError) as err:
        meta = {}
        problems.append(f"{meta_file(ckpt)} is unreadable ({type(err).__name__})")
    cfg = meta.get("config", {}) if isinstance(meta, dict) else {}
    return {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "complete": manifest is not None and not problems,
        "problems": problems,
        "world_size": meta.get("world_size"),
        "zero_stage": meta.get("zero_stage"),
        "dtype": meta.get("dtype"),
        "versions": meta.get("versions"),
        "job": cfg.get("run", {}).get("job"),
        "model": cfg.get("model", {}).get("name"),
        "total_steps": cfg.get("train", {}).get("total_steps"),
        "global_batch": cfg.get("train", {}).get("global_batch"),
        "files": len(manifest["files"]) if manifest else 0,
        "bytes": sum(e["size"] for e in manifest["files"].values()) if manifest else 0,
    }


def consolidated_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict of one checkpoint, in memory, collective-free (call it on one rank).

    ``path`` is a step folder, or a run or ``checkpoints`` folder (its newest complete checkpoint). Before any
    tensor is read, every file must match the manifest and every pickle must pass the weights-only unpickler.
    At ZeRO 0 (from the checkpoint's meta file) the module comes from DeepSpeed's model file, read weights-only;
    at ZeRO 1-3 DeepSpeed's ``zero_to_fp32`` merges the partitions of every rank.

    Returns:
        {name: tensor}, floating tensors as contiguous fp32.

    Raises:
        ValueError: the checkpoint is incomplete, damaged or records no ZeRO stage.
        UnsafeCheckpointError: a pickle needs objects outside the allowlist (nothing was executed).
    """
    ckpt = resolve_checkpoint(path)
    report = inspect(ckpt)
    if not report["complete"]:
        raise ValueError(f"checkpoint {ckpt} is not complete: {'; '.join(report['problems'])}")
    unsafe = check_unpickle_safe(sorted(ckpt.glob("*.pt")))
    if unsafe:
        raise UnsafeCheckpointError(f"checkpoint {ckpt} not consolidated: {'; '.join(unsafe)}")
    stage = report["zero_stage"]
    if stage == 0:  # no partitions: the whole module is in one file
        with torch.serialization.safe_globals(_deepspeed_allowlist()):
            state = torch.load(ckpt / STAGE0_MODEL_FILE, map_location="cpu", weights_only=True)["module"]
    elif stage in (1, 2, 3):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints; keep stdout for the CLI's JSON
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        raise ValueError(f"checkpoint {ckpt}: {meta_file(ckpt).name} records zero_stage={stage!r}, not 0, 1, 2 or 3")
    log.info("consolidated %d tensors from checkpoint %s (ZeRO %d)", len(state), ckpt, stage)
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def consolidate(path: str | Path, out: str | Path) -> Path:
    """A checkpoint (:func:`consolidated_state`) -> one fp32 safetensors file, with the run's config beside it."""
    ckpt = resolve_checkpoint(path)
    state = consolidated_state(ckpt)
    meta = json.loads(meta_file(ckpt).read_text())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = meta["config"].get("model", {}).get("name") or ""
    save_weights(state, out, {"format": "beit_scale.consolidated.v1", "step": str(meta["step"]), "model": model})
    out.with_suffix(".yaml").write_text(yaml.safe_dump(meta["config"], sort_keys=False))
    log.info("wrote %s (%d tensors, step %d) and %s", out, len(state), meta["step"], out.with_suffix(".yaml"))
    return out
