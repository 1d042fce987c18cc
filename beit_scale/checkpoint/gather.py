"""Gather the full (unsharded) weights of an engine's module on every ZeRO stage."""
from __future__ import annotations

import deepspeed
import torch


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's state dict, gathered from ZeRO-3 partitions where needed, as fp32 CPU copies.

    Collective under ZeRO-3: every rank must call it.
    """
    module = engine.module

    def copy() -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return copy()
    return copy()
