"""Tokenizer files: safetensors weights with the architecture in the metadata. No pickle anywhere."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from beit_scale.checkpoint.weights import save_weights
from beit_scale.tokenizers import DiscreteVAE, DVAEArch

FORMAT = "beit_scale.dvae.v1"


def save_tokenizer(model: DiscreteVAE, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write the tokenizer; ``state_dict`` is full and unsharded (fp32 on CPU), written atomically."""
    meta = {"format": FORMAT, "arch": json.dumps(dataclasses.asdict(model.arch))}
    save_weights({k: v.detach().float().cpu() for k, v in state_dict.items()}, path, meta)


def read_tokenizer_arch(path: str | Path) -> DVAEArch:
    """The architecture of a tokenizer file, from its metadata only (cheap: used to validate configs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer.path={str(path)!r}: no such file; train one with `beit-scale train-tokenizer`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"tokenizer.path={str(path)!r} is not a safetensors tokenizer file: {err}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"tokenizer.path={str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    expected = sorted(f.name for f in dataclasses.fields(DVAEArch))
    try:
        arch = json.loads(meta.get("arch", ""))
    except json.JSONDecodeError:
        arch = None
    if not isinstance(arch, dict) or sorted(arch) != expected:
        found = sorted(arch) if isinstance(arch, dict) else "nothing readable"
        raise ValueError(f"tokenizer.path={str(path)!r}: its metadata 'arch' must hold exactly {expected}, found "
                         f"{found}; the file was not written by `beit-scale train-tokenizer` of this version")
    return DVAEArch(**arch)


def load_tokenizer(path: str | Path) -> DiscreteVAE:
    """Rebuild a trained dVAE from its file, strictly, in eval mode with gradients off."""
    model = DiscreteVAE(read_tokenizer_arch(path))
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()][1:4]
        raise ValueError(f"tokenizer.path={str(path)!r}: the weights do not match the architecture in its "
                         f"metadata ({'; '.join(lines)[:400]}); the file is damaged or was edited") from None
    model.eval().requires_grad_(False)
    return model
