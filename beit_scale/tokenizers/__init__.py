"""Visual tokenizers for BEiT: the :class:`VisualTokenizer` protocol and a trainable discrete VAE."""

from beit_scale.tokenizers.base import VisualTokenizer, check_token_grid, codebook_stats
from beit_scale.tokenizers.dvae import DiscreteVAE, DVAEArch, DVAEOutput, gumbel_temperature

__all__ = [
    "DVAEArch",
    "DVAEOutput",
    "DiscreteVAE",
    "VisualTokenizer",
    "check_token_grid",
    "codebook_stats",
    "gumbel_temperature",
]
