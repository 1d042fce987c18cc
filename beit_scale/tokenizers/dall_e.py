"""OpenAI's DALL-E dVAE encoder, the tokenizer the published BEiT used, in plain PyTorch.

The tensors are those of the ``dall_e`` package's ``Encoder`` (``dall-e==0.1``, OpenAI's ``encoder.pkl``); this
module needs neither that package nor its pickle at run time: ``beit-scale convert-tokenizer dall-e`` turns the
official file into a safetensors tokenizer file once (``beit_scale/checkpoint/tokenizer_file.py``).

Shape: a 7x7 conv to ``hidden_dim`` channels, then four groups of ``num_blocks_per_group`` residual blocks at
``1, 2, 4, 8 x hidden_dim`` channels with a 2x2 max pool after each of the first three (8 px per token), then
ReLU and a 1x1 conv to ``vocab_size`` logits. A block adds its identity path (a 1x1 conv where the width
changes) to ``1 / num_layers**2`` times a bottleneck of ReLU-conv pairs (3x3, 3x3, 3x3, 1x1; a quarter of the
block's width inside), ``num_layers`` being the number of blocks in the encoder. The token is the argmax.

The encoder is one flat ``nn.Sequential`` so that :class:`~beit_scale.tokenizers.labeler.Labeler` can run its
trunk under autocast and the stage after the last max pool (the lowest resolution) in fp32.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict

from torch import Tensor, nn

from beit_scale.tokenizers.base import ArchTokenizer, check_arch_ints

__all__ = ["DALL_E_DOWNSAMPLE", "DallEArch", "DallEEncoder", "official_name"]

NUM_GROUPS = 4  # fixed by the official architecture: three 2x pools between four groups
DALL_E_DOWNSAMPLE = 2 ** (NUM_GROUPS - 1)  # pixels per token side
_PIXEL_EPS = 0.1  # DALL-E's logit_laplace_eps: pixels live in [eps, 1 - eps]


@dataclasses.dataclass(frozen=True)
class DallEArch:
    """Shape of a :class:`DallEEncoder`; ``dataclasses.asdict`` of it is enough to rebuild the model.

    The defaults are the official encoder's (``n_hid=256``, ``n_blk_per_group=2``, 8192 tokens).
    """

    vocab_size: int = 8192
    """Number of visual tokens (the official ``vocab_size``)."""
    input_size: int = 112
    """Side in pixels of the square tokenizer view, a multiple of 8: 112 for a 14x14 grid, 128 for 16x16."""
    hidden_dim: int = 256
    """Channels of the first group, doubled per group (the official ``n_hid``)."""
    num_blocks_per_group: int = 2
    """Residual blocks in each of the four groups (the official ``n_blk_per_group``)."""

    def __post_init__(self) -> None:
        check_arch_ints(self)
        if self.input_size < DALL_E_DOWNSAMPLE or self.input_size % DALL_E_DOWNSAMPLE:
            lower = self.input_size // DALL_E_DOWNSAMPLE * DALL_E_DOWNSAMPLE
            upper = lower + DALL_E_DOWNSAMPLE
            choices = f"{lower} or {upper}" if lower else str(upper)
            raise ValueError(
                f"tokenizer.input_size={self.input_size} (convert-tokenizer --input-size) must be a positive multiple "
                f"of {DALL_E_DOWNSAMPLE}: the DALL-E encoder reads {DALL_E_DOWNSAMPLE} px per token and the view is "
                f"never cropped; set it to {choices}, e.g. 112 for a 14x14 grid or 128 for 16x16"
            )
        if self.hidden_dim < 4 or self.hidden_dim % 4:
            raise ValueError(f"tokenizer.hidden_dim={self.hidden_dim} must be a positive multiple of 4 (DALL-E: 256)")
        if self.num_blocks_per_group < 1:
            raise ValueError(f"tokenizer.num_blocks_per_group={self.num_blocks_per_group} must be >= 1 (DALL-E: 2)")

    @property
    def downsample(self) -> int:
        """Pixels per token side (8)."""
        return DALL_E_DOWNSAMPLE

    @property
    def grid_size(self) -> int:
        """Tokens per side, ``input_size // 8``."""
        return self.input_size // DALL_E_DOWNSAMPLE

    @property
    def num_layers(self) -> int:
        """Residual blocks in the whole encoder; each residual branch is scaled by ``1 / num_layers**2``."""
        return NUM_GROUPS * self.num_blocks_per_group


class _Block(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; the residual path narrows to ``out_channels // 4`` inside."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int) -> None:
        super().__init__()
        inner = out_channels // 4
        self.post_gain = 1 / num_layers**2
        self.id_path = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()),
            ("conv_1", nn.Conv2d(in_channels, inner, 3, padding=1)),
            ("relu_2", nn.ReLU()),
            ("conv_2", nn.Conv2d(inner, inner, 3, padding=1)),
            ("relu_3", nn.ReLU()),
            ("conv_3", nn.Conv2d(inner, inner, 3, padding=1)),
            ("relu_4", nn.ReLU()),
            ("conv_4", nn.Conv2d(inner, out_channels, 1)),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)  # (B, out, h, w)


class DallEEncoder(ArchTokenizer, nn.Module):
    """DALL-E's dVAE encoder as a :class:`~beit_scale.tokenizers.VisualTokenizer` (weights from a converted file).

    Args:
        arch: Model shape; kept as ``self.arch`` so the model can be rebuilt from saved metadata.

    Example:
        >>> model = DallEEncoder(DallEArch(vocab_size=16, input_size=16, hidden_dim=8, num_blocks_per_group=1))
        >>> model.encode(model.map_pixels(torch.rand(2, 3, 16, 16))).shape
        torch.Size([2, 4])
    """

    def __init__(self, arch: DallEArch) -> None:
        super().__init__()
        self.arch = arch
        width = arch.hidden_dim
        layers: list[tuple[str, nn.Module]] = [("input", nn.Conv2d(3, width, 7, padding=3))]
        for group in range(1, NUM_GROUPS + 1):
            out = arch.hidden_dim * 2 ** (group - 1)
            for block in range(1, arch.num_blocks_per_group + 1):
                layers.append((f"group_{group}_block_{block}", _Block(width, out, arch.num_layers)))
                width = out
            if group < NUM_GROUPS:
                layers.append((f"group_{group}_pool", nn.MaxPool2d(kernel_size=2)))
        layers += [("output_relu", nn.ReLU()), ("output_conv", nn.Conv2d(width, arch.vocab_size, 1))]
        self.encoder = nn.Sequential(OrderedDict(layers))

    @staticmethod
    def map_pixels(x: Tensor) -> Tensor:
        """Maps ``[0, 1]`` pixels to ``[eps, 1 - eps]`` with DALL-E's ``logit_laplace_eps = 0.1``."""
        return (1 - 2 * _PIXEL_EPS) * x + _PIXEL_EPS

_GROUP_BLOCK = re.compile(r"^group_(\d+)_block_(\d+)\.")


def official_name(name: str) -> str:
    """The ``dall_e`` package's state-dict name of one of our parameter names.

    ``encoder.input.weight -> blocks.input.w``, ``encoder.group_2_block_1.id_path.bias ->
    blocks.group_2.block_1.id_path.b``, ``encoder.output_conv.weight -> blocks.output.conv.w``.

    Raises:
        ValueError: ``name`` is not a parameter name of :class:`DallEEncoder`.
    """
    match = re.fullmatch(r"encoder\.(.+)\.(weight|bias)", name)
    if match is None:
        raise ValueError(f"{name!r} is not a DallEEncoder parameter name (encoder.<layer>.weight or .bias)")
    body, leaf = match.groups()
    body = _GROUP_BLOCK.sub(r"group_\1.block_\2.", body + ".").rstrip(".")
    body = "output.conv" if body == "output_conv" else body
    return f"blocks.{body}.{'w' if leaf == 'weight' else 'b'}"
