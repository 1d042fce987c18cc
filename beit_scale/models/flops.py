"""FLOPs of a BEiT per image, from its shape: what MFU (model FLOPs utilisation) is measured against.

Counted: every matrix multiply (2 FLOPs per multiply-add) of the patch embedding, the blocks (q/k/v and
output projections, attention scores and weighted sum, MLP) and the head. Norms, softmax, biases and the
relative position bias are left out, as in the usual MFU accounting (PaLM, appendix B). A training step
costs three forwards (backward: two); a frozen part costs one.
"""
from __future__ import annotations

from beit_scale.models.zoo import BeitSpec


def block_flops(spec: BeitSpec, tokens: int) -> float:
    """One transformer block's forward over ``tokens`` tokens."""
    d = spec.embed_dim
    projections = 2 * tokens * d * (3 * d + d + 2 * spec.mlp_dim)  # qkv, attention output, MLP in and out
    attention = 2 * 2 * tokens * tokens * d  # q @ k^T and attn @ v over all heads
    return projections + attention


def backbone_flops(spec: BeitSpec, img_size: int, depth: int | None = None) -> float:
    """Forward of the patch embedding and the first ``depth`` blocks (default all) for one image."""
    patches = (img_size // spec.patch_size) ** 2
    embed = 2 * patches * 3 * spec.patch_size ** 2 * spec.embed_dim
    return embed + (spec.depth if depth is None else depth) * block_flops(spec, patches + 1)


def head_flops(spec: BeitSpec, tokens: float, outputs: int) -> float:
    """A linear head from the embedding to ``outputs`` on ``tokens`` tokens per image."""
    return 2 * tokens * spec.embed_dim * outputs


def train_flops(forward_trained: float, forward_frozen: float = 0.0) -> float:
    """FLOPs of one training step per image: forward and backward (x3) of what trains, forward of what is frozen."""
    return 3 * forward_trained + forward_frozen
