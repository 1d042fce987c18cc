"""Build the DeepSpeed engine: client AdamW with decay groups, timm's cosine schedule, injected batch config."""
from __future__ import annotations

import logging

import deepspeed
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from beit_scale.config import OptimConfig

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms (1-D), position tables and special tokens."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class StepSchedule:
    """Warmup then cosine, defined in global optimizer steps, on timm's CosineLRScheduler.

    Stateless with respect to checkpoints: ``apply(step)`` sets every group's lr for optimizer step ``step``
    (times its ``lr_scale`` if present), so a resumed run only needs its step counter.
    """

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int):
        self._sched = CosineLRScheduler(
            optimizer,
            t_initial=max(1, total_steps - cfg.warmup_steps),
            lr_min=cfg.min_lr,
            warmup_t=cfg.warmup_steps,
            warmup_lr_init=0.0,
            warmup_prefix=True,
            t_in_epochs=False,
        )

    def apply(self, step: int) -> None:
        self._sched.step_update(step)


def build_engine(model: nn.Module, optim_cfg: OptimConfig, ds_config: dict, total_steps: int):
    """Wrap ``model`` in a DeepSpeed engine; returns (engine, schedule)."""
    optimizer = build_optimizer(model, optim_cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    schedule = StepSchedule(engine.optimizer, optim_cfg, total_steps)
    return engine, schedule


def engine_dtype(engine) -> torch.dtype:
    """dtype the wrapped module computes in (bf16 or fp32); inputs are cast to it."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def grad_norm(engine) -> torch.Tensor:
    """The global grad norm DeepSpeed computed for the last step, as a tensor (nan where unavailable)."""
    norm = engine.get_global_grad_norm()
    return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()
