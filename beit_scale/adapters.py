"""From the config tree to plain constructor arguments: the patch grid of the model and the tokenizer's arch."""
from __future__ import annotations

from beit_scale.config import Config
from beit_scale.models.zoo import get_spec


def patch_grid(cfg: Config) -> tuple[int, int]:
    """(tokens per side, image px) of the patch view after checking that the patch size divides it."""
    spec = get_spec(cfg.model.name)
    img = cfg.model.img_size or spec.img_size
    if img % spec.patch_size:
        raise ValueError(
            f"model.img_size={img} is not divisible by the patch size {spec.patch_size} of {cfg.model.name}; "
            f"use a multiple of {spec.patch_size}, e.g. {img - img % spec.patch_size or spec.patch_size}"
        )
    return img // spec.patch_size, img


def tokenizer_arch_kwargs(cfg: Config) -> dict:
    """``DVAEArch`` keyword arguments from ``cfg.tokenizer``."""
    t = cfg.tokenizer
    return dict(vocab_size=t.vocab_size, input_size=t.input_size, downsample=t.downsample,
                hidden_dim=t.hidden_dim, codebook_dim=t.codebook_dim, num_res_blocks=t.num_res_blocks)


def vqkd_arch_kwargs(cfg: Config) -> dict:
    """``VQKDArch`` keyword arguments from ``cfg.tokenizer`` (``tokenizer.kind=vqkd``)."""
    t = cfg.tokenizer
    return dict(vocab_size=t.vocab_size, input_size=t.input_size, downsample=t.downsample, embed_dim=t.embed_dim,
                depth=t.depth, num_heads=t.num_heads, codebook_dim=t.codebook_dim)
