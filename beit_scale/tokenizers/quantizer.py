"""A cosine-similarity vector quantizer with an EMA codebook (BEiT v2's VQ-KD, arXiv 2208.06366).

Encoder outputs and codes are l2-normalised, so the nearest code by cosine similarity is the argmax of a dot
product. The codebook is not learned by gradients: after each training forward, every code that was chosen
moves towards the (normalised) mean of the vectors that chose it, ``c <- normalize(decay * c + (1 - decay) *
normalize(sum))``, and is renormalised. A code nobody chose for ``dead_code_steps`` steps restarts from a random
encoder output of the current batch. Gradients reach the encoder through the straight-through estimator; the
commitment loss pulls the encoder outputs towards their codes.

Several ranks: the per-code sums and counts (and the restart candidates) go through one all-reduce, so every
rank applies the same update and keeps the same codebook. The statistics stay in float32 whatever dtype the
module is cast to (DeepSpeed casts the whole module to bf16 or fp16): a 0.99 EMA step is below bf16's resolution.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NormEMAQuantizer", "QuantizerOutput"]


class QuantizerOutput(NamedTuple):
    quantized: Tensor
    """``(..., D)`` float32 codes with the straight-through gradient: the codes' values, the inputs' gradient."""
    ids: Tensor
    """``(...)`` int64 code ids."""
    commit_loss: Tensor
    """0-dim float32 MSE between the normalised inputs and their (detached) codes."""


class NormEMAQuantizer(nn.Module):
    """Nearest l2-normalised code by cosine similarity; codebook kept by EMA of the vectors assigned to it.

    Args:
        vocab_size: Number of codes.
        dim: Width of each code.
        decay: EMA decay per training forward, in ``[0, 1)`` (BEiT v2: 0.99).
        dead_code_steps: A code unused for this many consecutive training forwards restarts from a random vector
            of the current batch; 0 never restarts.
    """

    def __init__(self, vocab_size: int, dim: int, decay: float = 0.99, dead_code_steps: int = 0) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"tokenizer.ema_decay={decay} must be in [0, 1), e.g. 0.99")
        if dead_code_steps < 0:
            raise ValueError(f"tokenizer.dead_code_steps={dead_code_steps} must be >= 0 (0 = never restart)")
        self.vocab_size, self.dim, self.decay, self.dead_code_steps = vocab_size, dim, decay, dead_code_steps
        self.register_buffer("codebook", F.normalize(torch.randn(vocab_size, dim), dim=-1))  # (K, D), unit rows
        self.register_buffer("cluster_size", torch.zeros(vocab_size))  # (K,) EMA of the codes' counts, all ranks
        self.register_buffer("unused_steps", torch.zeros(vocab_size, dtype=torch.int64))  # (K,) steps since used

    def _apply(self, fn, recurse=True):
        # Keep the codebook statistics in float32 when the module is cast (module.bfloat16(), .half()).
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def similarity(self, z: Tensor) -> Tensor:
        """``(..., K)`` cosine similarity of l2-normalised ``(..., D)`` float32 vectors to every code."""
        return z @ self.codebook.t()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantizes ``(..., D)`` vectors (normalised here, in float32); updates the codebook when training."""
        z = F.normalize(z.float(), dim=-1)
        ids = self.similarity(z).argmax(-1)  # (...,)
        codes = F.embedding(ids, self.codebook)  # (..., D), looked up before this step's update
        if self.training:
            self.update(z.detach().reshape(-1, self.dim), ids.reshape(-1))
        commit_loss = F.mse_loss(z, codes)
        return QuantizerOutput(z + (codes - z).detach(), ids, commit_loss)

    @torch.compiler.disable  # a collective and in-place buffer updates: run eagerly under torch.compile
    @torch.no_grad()
    def update(self, z: Tensor, ids: Tensor) -> None:
        """One EMA step from ``(n, D)`` normalised vectors and their ``(n,)`` code ids (summed over ranks)."""
        K, D = self.vocab_size, self.dim
        sums = torch.zeros(K, D, device=z.device).index_add_(0, ids, z)  # (K, D)
        counts = torch.zeros(K, device=z.device).index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        parts = [sums, counts[:, None]]
        if self.dead_code_steps:
            candidates = z[torch.randint(0, z.shape[0], (K,), device=z.device)]  # (K, D), one per code
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # code k takes its candidate from rank k % world: after the sum, every rank holds the same ones
                owner = torch.arange(K, device=z.device) % dist.get_world_size() == dist.get_rank()
                candidates = candidates * owner[:, None]
            parts.append(candidates)
        stats = torch.cat(parts, dim=1)  # (K, D + 1 [+ D])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        sums, counts = stats[:, :D], stats[:, D]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        used = counts > 0  # (K,)
        moved = F.normalize(self.decay * self.codebook + (1 - self.decay) * F.normalize(sums, dim=-1), dim=-1)
        codebook = torch.where(used[:, None], moved, self.codebook)
        if self.dead_code_steps:
            self.unused_steps.add_(1).masked_fill_(used, 0)
            dead = self.unused_steps >= self.dead_code_steps
            codebook = torch.where(dead[:, None], F.normalize(stats[:, D + 1:], dim=-1), codebook)
            self.unused_steps.masked_fill_(dead, 0)
        self.codebook.copy_(codebook)
