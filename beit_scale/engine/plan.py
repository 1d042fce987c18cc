"""`beit-scale plan`: per-GPU memory of each ZeRO set-up for a zoo model, and the fastest one that fits.

Model states follow DeepSpeed's own accounting for bf16 training with fp32 master weights and AdamW
(``estimate_zero2/3_model_states_mem_needs``: 2 bytes/param of bf16 weights, 18 of fp32 gradients,
weights and Adam moments, partitioned per stage). Activations follow Korthikanti et al. (2022) for a
transformer layer with fused (SDPA) attention: about 34 bytes per token per channel in bf16, or only the
layer inputs (2 bytes) when blocks are recomputed, plus one layer's full set during recomputation.
Speeds are relative factors measured on an H100 for beit_base (benchmarks/results): ZeRO-1 and ZeRO-2
alike, ZeRO-3 about half, recomputation about 3/4, optimizer offload about 1/3.

The ds_config written for the chosen set-up sizes DeepSpeed's knobs in transformer blocks, the unit the model
computes in: gradient buckets of one block's parameters on one node and more across nodes (each collective
over the network pays more latency, so fewer and larger ones), and at ZeRO-3 each block is a leaf module
(gathered whole by one hook instead of one per linear), one block prefetched ahead, at most three blocks'
parameters gathered at once. The shipped ds_configs/{base,large,giant}.json are this module's choice for
the cluster in ``SHIPPED`` (tests/unit/test_plan.py keeps them so).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from beit_scale.models import BeitMIM, get_spec

GIB = 2**30
CONTEXT_BYTES = 1.0 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
SPEED = {1: 1.0, 2: 0.98, 3: 0.53}  # relative throughput per ZeRO stage (H100, beit_base, 1 GPU)
RECOMPUTE_SPEED = 0.75
OFFLOAD_SPEED = 0.33
BLOCK_CLASS = "timm.models.beit.Block"  # what ZeRO-3 gathers as one leaf module
PREFETCH_BLOCKS = 1  # blocks' parameters fetched ahead of the one running
LIVE_BLOCKS = 3  # at most this many blocks' parameters gathered at once: running, prefetched, being released
GPUS_PER_NODE = 8

# ds_config file -> (model, GPUs, GiB per GPU, GPUs per node) it was planned for: the recipes' reference clusters
# (base: 64 GPUs at micro 32; large and giant: 128 at micro 16, global batch 2048) on 80 GB cards; giant_zero3
# is the giant's fastest ZeRO-3 set-up on one node, for cards or resolutions where ZeRO-1 does not fit.
SHIPPED = {"base.json": ("beit_base_patch16_224", 64, 80.0, 8),
           "large.json": ("beit_large_patch16_224", 128, 80.0, 8),
           "giant.json": ("beit_giant_patch14_224", 128, 80.0, 8),
           "giant_zero3.json": ("beit_giant_patch14_224", 8, 80.0, 8)}


@dataclass(frozen=True)
class Candidate:
    zero_stage: int
    offload_optimizer: bool
    grad_checkpointing: bool
    micro_batch: int
    model_states_gib: float
    activations_gib: float
    total_gib: float
    relative_speed: float

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


def model_counts(name: str, vocab_size: int = 8192) -> tuple[int, int]:
    """(total parameters of the MIM model, parameters of its largest block), built on the meta device."""
    with torch.device("meta"):
        model = BeitMIM(get_spec(name), vocab_size)
    total = sum(p.numel() for p in model.parameters())
    largest = max([sum(p.numel() for p in m.parameters()) for m in model.blocks] + [model.lm_head.weight.numel()])
    return total, largest


def block_params(name: str) -> int:
    """Parameters of one transformer block of a zoo model (the unit of buckets and ZeRO-3 gathering)."""
    with torch.device("meta"):
        model = BeitMIM(get_spec(name), 8192)
    return sum(p.numel() for p in model.blocks[0].parameters())


def model_states_bytes(total: int, largest: int, stage: int, gpus: int, offload: bool) -> float:
    """Per-GPU bytes of weights, gradients and optimizer states (DeepSpeed's accounting, no buffer factor)."""
    if stage == 3:
        return 4 * largest + (0 if offload else 18 * total / gpus)
    if offload:  # optimizer states and fp32 gradients on the CPU
        return 2 * total
    if stage == 2:
        return 2 * total + 18 * total / gpus
    return 4 * total + 16 * total / gpus  # stage 1: bf16 gradients kept whole, fp32 states partitioned


def activation_bytes(name: str, micro_batch: int, grad_checkpointing: bool, num_masked: int | None = None,
                     vocab_size: int = 8192) -> float:
    """Activations of one micro batch in bf16 for MIM pretraining of a zoo model at its image size."""
    spec = get_spec(name)
    tokens = (spec.img_size // spec.patch_size) ** 2 + 1
    masked = num_masked if num_masked is not None else round(0.4 * (tokens - 1))
    d, hidden = spec.embed_dim, spec.mlp_dim
    per_layer = tokens * micro_batch * (34 * d + 4 * (hidden - 4 * d))  # an MLP wider than 4d (giant) stores more
    if grad_checkpointing:
        layers = spec.depth * 2 * tokens * micro_batch * d + per_layer
    else:
        layers = spec.depth * per_layer
    head = micro_batch * masked * vocab_size * (2 + 4 + 4)  # bf16 logits, fp32 copy and its gradient
    return layers + head


def plan(name: str, gpus: int, gpu_mem_gib: float, max_micro_batch: int = 256,
         stages: tuple[int, ...] = (1, 2, 3)) -> list[Candidate]:
    """Every set-up with the largest power-of-two micro batch that fits, fastest first (micro 0: does not fit)."""
    if gpus < 1 or gpu_mem_gib <= 0:
        raise ValueError(f"--gpus={gpus} must be >= 1 and --gpu-mem={gpu_mem_gib} > 0")
    if not stages or set(stages) - {1, 2, 3}:
        raise ValueError(f"--stages={','.join(map(str, stages))}: choose among the ZeRO stages 1, 2, 3")
    total, largest = model_counts(name)
    budget = gpu_mem_gib * GIB - CONTEXT_BYTES
    out = []
    for stage in stages:
        for offload in (False, True):
            if offload and stage == 1:
                continue  # DeepSpeed offloads the optimizer from ZeRO-2 on
            for ckpt in (False, True):
                states = model_states_bytes(total, largest, stage, gpus, offload)
                micro = 0
                b = 1
                while b <= max_micro_batch and states + activation_bytes(name, b, ckpt) <= budget:
                    micro, b = b, b * 2
                acts = activation_bytes(name, max(micro, 1), ckpt)
                speed = SPEED[stage] * (RECOMPUTE_SPEED if ckpt else 1) * (OFFLOAD_SPEED if offload else 1)
                speed *= min(1.0, math.log2(micro + 1) / math.log2(33)) if micro else 0  # small batches starve the GPU
                out.append(Candidate(stage, offload, ckpt, micro, round(states / GIB, 2), round(acts / GIB, 2),
                                     round((states + acts + CONTEXT_BYTES) / GIB, 2), round(speed, 3)))
    return sorted(out, key=lambda c: (-c.relative_speed, -c.micro_batch))


def bucket_elements(block: int, nodes: int) -> int:
    """Gradient bucket in parameters: one block's on one node, two up to 8 nodes, four beyond."""
    return block * (1 if nodes <= 1 else 2 if nodes <= 8 else 4)


def zero3_settings(block: int, embed_dim: int) -> dict:
    """ZeRO-3 sized in blocks: each block a leaf module, one prefetched, LIVE_BLOCKS gathered at most; vectors
    of up to 10 x width (norms, biases, layer scales) stay whole on every GPU."""
    return {"leaf_module": {"classes": [BLOCK_CLASS]},
            "stage3_prefetch_bucket_size": PREFETCH_BLOCKS * block,
            "stage3_max_live_parameters": LIVE_BLOCKS * block,
            "stage3_max_reuse_distance": LIVE_BLOCKS * block,
            "stage3_param_persistence_threshold": 10 * embed_dim}


def ds_config_for(c: Candidate, name: str, nodes: int = 1) -> dict:
    """The ds_config (ZeRO, offload, buckets, precision only) for a chosen candidate of model ``name``."""
    block = block_params(name)
    bucket = bucket_elements(block, nodes)
    zero: dict = {"stage": c.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": bucket}
    if c.zero_stage == 3:
        zero.update(zero3_settings(block, get_spec(name).embed_dim))
    else:
        zero["allgather_bucket_size"] = bucket
    if c.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if c.zero_stage == 3:  # the estimate keeps only the largest gathered layer on the GPU
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"zero_optimization": zero, "bf16": {"enabled": True}}


def format_plan(name: str, gpus: int, gpu_mem_gib: float, rows: list[Candidate]) -> str:
    lines = [f"{name} on {gpus} GPU(s) of {gpu_mem_gib:g} GiB (bf16, AdamW); estimates per GPU",
             f"{'zero':>4} {'offload':>7} {'ckpt':>5} {'micro':>5} {'states':>8} {'acts':>8} {'total':>8} {'speed':>6}"]
    for c in rows:
        lines.append(f"{c.zero_stage:>4} {str(c.offload_optimizer):>7} {str(c.grad_checkpointing):>5} "
                     f"{c.micro_batch:>5} {c.model_states_gib:>7.2f}G {c.activations_gib:>7.2f}G "
                     f"{c.total_gib:>7.2f}G {c.relative_speed:>6.3f}")
    best = rows[0]
    if not best.fits:
        lines.append("nothing fits: use more GPUs or larger ones")
    else:
        lines.append(f"chosen: ZeRO-{best.zero_stage}, offload={best.offload_optimizer}, "
                     f"model.grad_checkpointing={str(best.grad_checkpointing).lower()} "
                     f"train.micro_batch={best.micro_batch}")
    return "\n".join(lines)


def nodes_of(gpus: int, gpus_per_node: int) -> int:
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node={gpus_per_node} must be >= 1")
    return -(-gpus // gpus_per_node)


def shipped_ds_config(file: str) -> dict:
    """What ``plan`` writes for a shipped ds_config's reference cluster (``SHIPPED``)."""
    name, gpus, mem, per_node = SHIPPED[file]
    stages = (3,) if "zero3" in file else (1, 2, 3)
    return ds_config_for(plan(name, gpus, mem, stages=stages)[0], name, nodes_of(gpus, per_node))


def write_plan(rows: list[Candidate], path: Path, name: str, nodes: int = 1) -> None:
    best = rows[0]
    if not best.fits:
        raise ValueError("no configuration fits; nothing written")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds_config_for(best, name, nodes), indent=2) + "\n")
    path.with_suffix(".plan.json").write_text(json.dumps([asdict(c) for c in rows], indent=1))
