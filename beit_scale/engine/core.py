"""Build the DeepSpeed engine: client AdamW with decay groups, timm's cosine or poly schedule, injected batch config."""
from __future__ import annotations

import logging

import deepspeed
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch import nn

from beit_scale.config import OptimConfig
from beit_scale.engine.syncs import fewer_step_syncs

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms (1-D), position tables and special tokens."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def build_optimizer(model: nn.Module, cfg: OptimConfig, groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups`` (e.g. layer-decay groups with ``lr_scale``), by default :func:`param_groups`.

    Fused: one kernel for every parameter of a group instead of a loop of small ones (CUDA and CPU alike).
    """
    groups = param_groups(model, cfg.weight_decay) if groups is None else groups
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


class StepSchedule:
    """Linear warmup from 0, then cosine (``optim.schedule=cosine``, timm's CosineLRScheduler) or poly
    (``optim.schedule=poly``, timm's PolyLRScheduler), defined in global optimizer steps.

    Cosine runs over the steps after the warmup. Poly is mmseg's, which BEiT's segmentation uses: the decay
    counts from step 0 over all ``total_steps`` and the warmup ramps up to it,
    ``lr(step) = min_lr + (lr - min_lr) * (1 - step / total_steps) ** poly_power`` after the warmup.

    Stateless with respect to checkpoints: ``apply(step)`` sets every group's lr for optimizer step ``step``
    (times its ``lr_scale`` if present), so a resumed run only needs its step counter.
    """

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int):
        if cfg.schedule == "poly":
            self._sched = PolyLRScheduler(
                optimizer,
                t_initial=max(1, total_steps),
                power=cfg.poly_power,
                lr_min=cfg.min_lr,
                warmup_t=cfg.warmup_steps,
                warmup_lr_init=0.0,
                warmup_prefix=False,
                t_in_epochs=False,
            )
            return
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


def leaf_modules_for(model: nn.Module, ds_config: dict) -> dict:
    """``ds_config`` without the ZeRO-3 leaf-module classes that ``model`` does not contain.

    One ds_config serves several jobs (``tiny.json`` names timm's Beit ``Block`` for the ViTs; the dVAE has none),
    and DeepSpeed warns on every start when no module matches. Classes are matched by their dotted path, as
    DeepSpeed names them; a leaf-module section that also lists names or name suffixes is left alone.
    """
    zero = ds_config.get("zero_optimization", {})
    leaf = zero.get("leaf_module")
    if not isinstance(leaf, dict) or set(leaf) != {"classes"}:
        return ds_config
    present = {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}
    present |= {type(m).__name__ for m in model.modules()}
    kept = [c for c in leaf["classes"] if c in present]
    if kept == list(leaf["classes"]):
        return ds_config
    log.debug("ZeRO leaf-module classes absent from %s dropped: %s", type(model).__name__,
              sorted(set(leaf["classes"]) - set(kept)))
    zero = {k: v for k, v in zero.items() if k != "leaf_module"}
    if kept:
        zero["leaf_module"] = {"classes": kept}
    return {**ds_config, "zero_optimization": zero}


def build_engine(model: nn.Module, optim_cfg: OptimConfig, ds_config: dict, total_steps: int,
                 groups: list[dict] | None = None):
    """Wrap ``model`` in a DeepSpeed engine; returns (engine, schedule). ``groups``: see :func:`build_optimizer`."""
    optimizer = build_optimizer(model, optim_cfg, groups)
    ds_config = leaf_modules_for(model, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    fewer_step_syncs(engine)
    schedule = StepSchedule(engine.optimizer, optim_cfg, total_steps)
    return engine, schedule


def engine_dtype(engine) -> torch.dtype:
    """dtype the wrapped module computes in (bf16, fp16 or fp32); inputs are cast to it."""
    if engine.fp16_enabled():
        return torch.float16
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def backward_step(engine, loss: torch.Tensor) -> bool:
    """Backward of one micro batch's loss, then :func:`guarded_step`; True when an optimizer step was applied
    (or the accumulation boundary is still ahead)."""
    engine.backward(loss)
    return guarded_step(engine)


def guarded_step(engine) -> bool:
    """``engine.step()``; False when the optimizer step was skipped for a non-finite gradient.

    DeepSpeed already skips such steps on every rank together, except with ZeRO-0 in fp32, where a NaN
    gradient would reach the weights: there the (all-reduced, identical on every rank) gradients are
    checked at the accumulation boundary and the update is skipped.
    """
    if (engine.zero_optimization_stage() == 0 and engine_dtype(engine) == torch.float32
            and engine.is_gradient_accumulation_boundary()):
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norms = torch._foreach_norm([p.grad for p in params]) if params else []
        finite = bool(torch.isfinite(torch.stack(norms)).all()) if norms else True  # one host sync
        if finite:
            engine.step()
            return True
        # Skip the update but keep DeepSpeed's own step bookkeeping: zero gradients (clipping stays finite)
        # and an optimizer.step that does nothing for this one call, so AdamW's moments and counts stay put.
        for p in params:
            p.grad.zero_()
        optimizer = engine.optimizer
        optimizer.step = lambda *args, **kwargs: None  # instance attribute shadows the method once
        try:
            engine.step()
        finally:
            del optimizer.step
        return False
    engine.step()
    return engine.was_step_applied()
