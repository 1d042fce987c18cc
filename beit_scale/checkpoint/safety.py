"""Refuse pickles that could run code before DeepSpeed unpickles them.

DeepSpeed loads its shards with ``torch.load(weights_only=False)``. Before a checkpoint is handed to it,
every ``.pt`` file is read once with PyTorch's restricted unpickler (``weights_only=True``), allowing only
the few plain DeepSpeed classes its own checkpoints contain. A file that needs anything else is refused,
so a planted or altered pickle never executes.
"""
from __future__ import annotations

from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects outside the allowlist; nothing was executed."""


def _deepspeed_allowlist() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_unpickle_safe(paths: list[Path]) -> list[str]:
    """Problems (``"<path>: <reason>"``) for files the restricted unpickler refuses; empty when all are safe."""
    problems = []
    allow = _deepspeed_allowlist()
    for path in paths:
        if path.suffix != ".pt":
            continue
        try:
            with torch.serialization.safe_globals(allow):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # UnpicklingError, RuntimeError for malformed zip files, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(f"{path}: refused by the weights-only unpickler ({first[:200]})")
    return problems
