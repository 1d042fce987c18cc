"""Fewer host syncs in DeepSpeed's ZeRO-1/2 optimizer step (read from DeepSpeed 0.19.8's source; see
shared/notes/deepspeed-perf.md).

At every step its ``stage_1_and_2`` optimizer (a) sweeps every gradient for inf/NaN and reads the verdict with
``.item()`` (bf16), then (b) computes the global gradient norm and asks ``is_invalid_grad_norm`` whether it is
finite, once in ``step`` and again in ``unscale_and_clip_grads`` for every parameter group: each ask is a
``bool(tensor)``, a host sync (about 2 + the number of groups per step; layer decay makes 30 groups).

Here (a) is dropped where (b) already decides the same thing, and (b) is asked once per norm tensor:

* The sweep is redundant whenever the norm is computed (``compute_grad_norm``, always at ZeRO-1): a non-finite
  gradient makes the norm non-finite, DeepSpeed masks it to -1, and the norm check marks the step as an
  overflow, which skips it on every rank exactly as the sweep's verdict would (same ``self.overflow``).
* ``is_invalid_grad_norm`` is a pure function of the tensor's values: asked again about the same tensor, at
  the same version, it returns the first answer.

The norm itself (``scaled_global_norm``) loops over every gradient tensor of every parameter group: each is
cast to float64 and normed by its own kernels, each group's sum is all-reduced on its own (30 scalar
all-reduces per step with layer decay), and the -1 sentinel is made by a host-to-device copy. Here it is
:func:`fused_global_norm`: ``torch._foreach_norm`` (fp32 accumulation) per group, one all-reduce of the
vector of per-group squares, and the same result: the L2 norm over groups, or inf when any group's is not
finite (DeepSpeed's ``combine_grad_norm_groups`` contract, which the skip relies on).

The patch is tied to the pinned DeepSpeed: on another version it refuses, naming what to check.
"""
from __future__ import annotations

import logging

import types

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero import stage_1_and_2
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

log = logging.getLogger(__name__)
PINNED = "0.19.8"


def _once_per_norm(check):
    last: list = [None, -1, False]  # the tensor last asked about, its version, the answer

    def memo(norm) -> bool:
        if not torch.is_tensor(norm):
            return check(norm)
        if norm is last[0] and norm._version == last[1]:
            return last[2]
        answer = check(norm)
        last[:] = [norm, norm._version, answer]
        return answer

    memo.memoized = True
    return memo


def fused_global_norm(self: DeepSpeedZeroOptimizer, norm_type: float = 2) -> torch.Tensor:
    """``DeepSpeedZeroOptimizer.scaled_global_norm`` for the set-ups beit_scale runs (no CPU offload, MoE,
    Muon or model parallelism): per-group L2 norms of the partitioned gradients, combined over groups; inf when
    any is not finite. No host sync, one all-reduce."""
    assert norm_type == 2, "only L2 norm supported"
    squares = []
    for i in range(len(self.bit16_groups)):
        grads = [g for g in self.averaged_gradients[i] if not getattr(g, "_zero_padding", False)]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)  # one fused kernel per group
            squares.append(torch.stack(norms).square().sum())
        else:
            squares.append(torch.zeros((), dtype=torch.float32, device=self.device))
    squares = torch.stack(squares)  # (groups,) this rank's sums of squares
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=squares, op=dist.ReduceOp.SUM)
    group_norms = squares.sqrt()
    combined = torch.linalg.vector_norm(group_norms)
    return torch.where(torch.isfinite(group_norms).all(), combined, torch.full_like(combined, float("inf")))


def fewer_step_syncs(engine) -> bool:
    """Apply the above to ``engine``'s ZeRO-1/2 optimizer; False (nothing to do) at ZeRO-0 and ZeRO-3."""
    if deepspeed.__version__ != PINNED:
        raise RuntimeError(f"beit_scale.engine.syncs patches DeepSpeed {PINNED}'s ZeRO-1/2 step, not "
                           f"{deepspeed.__version__}: check stage_1_and_2.step, has_overflow and is_invalid_grad_norm "
                           "in the new release, then update PINNED (pyproject.toml pins deepspeed)")
    optimizer = engine.optimizer
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False
    if not getattr(stage_1_and_2.is_invalid_grad_norm, "memoized", False):
        stage_1_and_2.is_invalid_grad_norm = _once_per_norm(stage_1_and_2.is_invalid_grad_norm)
    if optimizer.compute_grad_norm and optimizer.check_grad_overflow and not optimizer.cpu_offload:
        optimizer.has_overflow = lambda partition_gradients=True: False  # the norm check decides (module doc)
    plain = isinstance(optimizer.optimizer, torch.optim.AdamW) and optimizer.model_parallel_rank == 0
    if plain and not (optimizer.cpu_offload or optimizer.has_moe_layers):
        optimizer.scaled_global_norm = types.MethodType(fused_global_norm, optimizer)
    return True
