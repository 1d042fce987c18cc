"""The tokenizer labelling pretraining batches at speed: reduced precision where it is safe, fp32 where it decides.

A visual token is an argmax over the vocabulary, and a trained dVAE leaves many positions with two codes
nearly tied (measured on the quickstart tokenizers and held-out Fashion-MNIST: 13% of positions within 0.05
logits for the default one, 49% for the small one). Running the whole encoder under bf16 autocast changes 9% of
the ids; fp16 (3 more mantissa bits) 1.3%. The encoder's bottom stage (its last downsampling conv, the blocks
after it and the 1x1 logits conv: the lowest resolution, a small share of the FLOPs) is where the tie is
decided, so :class:`Labeler` runs the trunk under autocast and that stage in fp32: fp16 then agrees with fp32
on 99.85-99.93% of positions and bf16 on 99.1-99.2% (README; tests/integration/test_quickstart.py).
:meth:`Labeler.agreement` measures it on a run's own tokenizer and images, so a run can tell.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _downsamples(module: nn.Module) -> bool:
    """A strided convolution (the dVAE) or a max pool (DALL-E's encoder)."""
    return (isinstance(module, nn.Conv2d) and module.stride != (1, 1)) or isinstance(module, nn.MaxPool2d)


def split_encoder(encoder: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    """``(trunk, bottom)``: the encoder before its last downsampling layer (a strided conv or a max pool), and
    that layer with the layers after it.

    Raises:
        ValueError: The encoder has no downsampling layer (no lowest-resolution stage to split at).
    """
    downs = [i for i, m in enumerate(encoder) if _downsamples(m)]
    if not downs:
        raise ValueError("the tokenizer's encoder has no downsampling layer (strided conv or max pool) to split the "
                         "fp32 stage at")
    return encoder[: downs[-1]], encoder[downs[-1]:]


class Labeler(nn.Module):
    """Token ids of tokenizer views, as ``tokenizer.encode`` gives them, at the chosen precision.

    A :class:`~beit_scale.tokenizers.VisualTokenizer` itself (the tokenizer's sizes and pixel map).

    Args:
        tokenizer: A :class:`~beit_scale.tokenizers.DiscreteVAE` or :class:`~beit_scale.tokenizers.DallEEncoder`
            (anything with an ``encoder`` Sequential of convolutions ending in logits, ``input_size`` and
            ``vocab_size``), in eval mode, on its device. A tokenizer with no such encoder names its own two stages
            with ``labeling_stages()``: a :class:`~beit_scale.tokenizers.VQKDTokenizer` runs its ViT encoder under
            autocast and the projection and cosine similarity to the codebook (where the token is decided) in fp32.
        precision: ``fp32`` (the tokenizer's own ``encode``, exact), ``fp16`` or ``bf16`` (trunk under autocast,
            bottom stage in fp32).
        channels_last: Run the convolutions in channels-last memory format (faster on GPUs with tensor cores;
            not bitwise equal to contiguous, agreement measured 99.997%).
        compile: ``torch.compile`` the labelling function (when the training step is compiled).
    """

    def __init__(self, tokenizer: nn.Module, precision: Precision = "fp32", channels_last: bool = False,
                 compile: bool = False) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"tokenizer.precision={precision!r} must be one of fp32, bf16, fp16")
        self.tokenizer = tokenizer
        self.precision = precision
        self.channels_last = channels_last
        stages = getattr(tokenizer, "labeling_stages", None)  # VQ-KD: (ViT encoder, code similarities)
        self.trunk, self.bottom = stages() if stages is not None else split_encoder(tokenizer.encoder)
        if channels_last:
            tokenizer.to(memory_format=torch.channels_last)
        self._encode = torch.compile(self._ids, dynamic=False) if compile else self._ids
        self.nonfinite = None  # (,) int64 count of non-finite trunk outputs so far, on the device (no sync)

    # The VisualTokenizer protocol, so that a Labeler stands wherever the tokenizer did.
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def input_size(self) -> int:
        return self.tokenizer.input_size

    @property
    def grid_size(self) -> int:
        return self.tokenizer.grid_size

    def map_pixels(self, x: Tensor) -> Tensor:
        return self.tokenizer.map_pixels(x)

    def _ids(self, views: Tensor) -> tuple[Tensor, Tensor]:
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        reduced = self.precision != "fp32"
        with torch.autocast(views.device.type, dtype=_DTYPES.get(self.precision, torch.bfloat16), enabled=reduced):
            hidden = self.trunk(views)  # (B, C, h, w) (VQ-KD: (B, h * w, C)), in the autocast dtype when reduced
        # an fp16 overflow would make the argmax meaningless; fp32 needs no count (and no pass over the activations)
        bad = (~torch.isfinite(hidden)).sum() if reduced else torch.zeros((), dtype=torch.int64, device=views.device)
        return self.bottom(hidden.float()).float().argmax(1).flatten(1), bad  # (B, h * w)

    @torch.no_grad()
    def encode(self, views: Tensor) -> Tensor:
        """``(B, h * w)`` int64 ids of ``(B, 3, S, S)`` mapped views; counts non-finite activations on the side."""
        self.tokenizer._check_images(views)
        ids, bad = self._encode(views)
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite + bad
        return ids

    @torch.no_grad()
    def agreement(self, views: Tensor) -> float:
        """Fraction of positions whose id equals the fp32 tokenizer's on ``views`` (one host sync)."""
        reference = self.tokenizer.encode(views.contiguous())
        return float((self.encode(views) == reference).float().mean())
