"""`beit-scale inspect` and `beit-scale consolidate`: read a checkpoint without a process group."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from beit_scale.checkpoint.files import ManifestError, check_files, committed_tags, meta_file, read_manifest
from beit_scale.checkpoint.layout import RunLayout
from beit_scale.checkpoint.safety import UnsafeCheckpointError, check_unpickle_safe
from beit_scale.checkpoint.weights import save_weights

log = logging.getLogger(__name__)


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


def consolidate(path: str | Path, out: str | Path) -> Path:
    """ZeRO shards -> one fp32 safetensors file (DeepSpeed's zero_to_fp32), with the run's config beside it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = resolve_checkpoint(path)
    report = inspect(ckpt)
    if not report["complete"]:
        raise ValueError(f"checkpoint {ckpt} is not complete: {'; '.join(report['problems'])}")
    unsafe = check_unpickle_safe(sorted(ckpt.glob("*.pt")))
    if unsafe:
        raise UnsafeCheckpointError(f"checkpoint {ckpt} not consolidated: {'; '.join(unsafe)}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = json.loads(meta_file(ckpt).read_text())
    save_weights({k: v.float().contiguous() for k, v in state.items()}, out,
                 {"format": "beit_scale.consolidated.v1", "step": str(meta["step"]), "model": report["model"] or ""})
    out.with_suffix(".yaml").write_text(yaml.safe_dump(meta["config"], sort_keys=False))
    log.info("wrote %s (%d tensors, step %d) and %s", out, len(state), meta["step"], out.with_suffix(".yaml"))
    return out
