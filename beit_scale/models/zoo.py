"""The BEiT model zoo, kept as data: one :class:`BeitSpec` per size, named as timm names them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BeitSpec:
    """Shape of one BEiT backbone and the figures the paper publishes for it."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int  # hidden width of each MLP
    patch_size: int  # px per patch side
    img_size: int  # px of the pretraining view
    layer_scale: float  # initial layer-scale gamma (0.1 base, 1e-5 large and giant)
    published_params: float  # backbone parameters the paper reports (no MIM head, no [M])

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_dim / self.embed_dim


ZOO: dict[str, BeitSpec] = {
    # Tiny sizes for tests and the quickstart; published_params is our own count.
    "beit_tiny_patch4_32": BeitSpec(96, 4, 3, 384, 4, 32, 0.1, 0.45e6),
    # The same backbone on 64 px views (the whole Fashion-MNIST scene canvas) in 8x8 patches of 8 px.
    "beit_tiny_patch8_64": BeitSpec(96, 4, 3, 384, 8, 64, 0.1, 0.47e6),
    "beit_tiny_patch16_224": BeitSpec(192, 12, 3, 768, 16, 224, 0.1, 5.5e6),
    "beit_base_patch16_224": BeitSpec(768, 12, 12, 3072, 16, 224, 0.1, 86e6),
    "beit_large_patch16_224": BeitSpec(1024, 24, 16, 4096, 16, 224, 1e-5, 304e6),
    "beit_giant_patch14_224": BeitSpec(1408, 40, 16, 6144, 14, 224, 1e-5, 1.0e9),
}


def get_spec(name: str) -> BeitSpec:
    """The spec of a zoo model; ValueError listing the zoo for an unknown name."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"model.name={name!r} is not in the zoo; choose one of {', '.join(ZOO)}") from None
