"""Weights files: safetensors, written atomically."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``state_dict`` to a temporary file, then rename it into place."""
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
