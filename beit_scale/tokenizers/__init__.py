"""Visual tokenizers for BEiT: the :class:`VisualTokenizer` protocol, a trainable discrete VAE, a trainable VQ-KD
(BEiT v2) and DALL-E's encoder."""

from beit_scale.tokenizers.base import VisualTokenizer, check_token_grid, codebook_stats
from beit_scale.tokenizers.dall_e import DallEArch, DallEEncoder
from beit_scale.tokenizers.dvae import DiscreteVAE, DVAEArch, DVAEOutput, gumbel_temperature
from beit_scale.tokenizers.vqkd import VQKD, VQKDArch, VQKDOutput, VQKDTokenizer

__all__ = [
    "DallEArch",
    "DallEEncoder",
    "DVAEArch",
    "DVAEOutput",
    "DiscreteVAE",
    "VQKD",
    "VQKDArch",
    "VQKDOutput",
    "VQKDTokenizer",
    "VisualTokenizer",
    "check_token_grid",
    "codebook_stats",
    "gumbel_temperature",
]
