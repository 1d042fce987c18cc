"""BEiT semantic segmentation (arXiv 2106.08254, section 3.2): timm's ``Beit`` + multi-scale adapters + UperNet.

Plain PyTorch rebuild of the reference (``unilm/beit/semantic_segmentation``: ``backbone/beit.py`` and the
``upernet_beit_*`` configs on mmsegmentation 0.11's ``UPerHead`` and ``FCNHead``):

* The backbone is timm's ``Beit`` without final norm, pooling or head; the token maps after four blocks
  (:func:`feature_indices`: blocks 4, 6, 8, 12 of base, 8, 12, 16, 24 of large) are turned into a pyramid by
  the adapters ``fpn1`` (2 transposed convs, x4), ``fpn2`` (x2), ``fpn3`` (identity), ``fpn4`` (max pool, /2):
  1/4, 1/8, 1/16 and 1/32 of the input with patch 16.
* ``decode_head`` is UperNet: a pyramid pooling module (scales 1, 2, 3, 6) on the 1/32 level, 1x1 laterals,
  a top-down path with bilinear upsampling, 3x3 FPN convs, all levels fused at 1/4, dropout 0.1, 1x1 classifier.
  ``auxiliary_head`` is an FCN head (one 3x3 conv of 256 channels) on the 1/16 level, weighted 0.4 in the loss.
* Every conv + norm + ReLU block is :class:`ConvModule` with mmcv's child names (``conv``, ``bn``), and the heads
  keep mmseg's names (``decode_head.psp_modules``, ``lateral_convs``, ``fpn_bottleneck``, ``conv_seg``, ...), so a
  reference checkpoint maps onto this module by renaming ``backbone.fpnN`` to ``fpnN``.
* BatchNorm2d where the reference has SyncBatchNorm; ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` restores
  it for multi-GPU runs (the reference trains with 2 images per GPU).

The backbone only takes ``img_size`` x ``img_size`` inputs (its relative position tables are sized for that
window): evaluate larger images with :func:`slide_inference`, as every BEiT config of the reference does.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from torch import Tensor, nn

from beit_scale.models.classifier import classifier_kwargs
from beit_scale.models.convert import mim_to_timm_backbone
from beit_scale.models.zoo import BeitSpec

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
_EMBEDDINGS = ("cls_token", "pos_embed", "mask_token")
_EMBEDDING_MODULES = ("patch_embed.", "rel_pos_bias.")
_AFTER_BACKBONE = ("fpn1.", "fpn2.", "fpn3.", "fpn4.", "decode_head.", "auxiliary_head.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def feature_indices(depth: int) -> list[int]:
    """The blocks whose outputs feed the pyramid: after 1/3, 1/2, 2/3 and all of the depth, 0-based.

    Base (12) gives ``[3, 5, 7, 11]`` and large (24) ``[7, 11, 15, 23]``, the reference's ``out_indices``;
    small test depths are pushed apart so that the four are distinct (depth 4: ``[0, 1, 2, 3]``).
    """
    if depth < 4:
        raise ValueError(f"depth={depth}: the segmentation pyramid needs four distinct blocks, so depth >= 4")
    ids = [max(int(depth * k / 12 + 0.5) - 1, 0) for k in (4, 6, 8, 12)]
    for i in range(1, 4):
        ids[i] = max(ids[i], ids[i - 1] + 1)
    assert ids[-1] == depth - 1, ids
    return ids


class ConvModule(nn.Sequential):
    """mmcv's ConvModule as the reference configures it: conv without bias, BatchNorm, ReLU.

    Initialised as mmcv does: Kaiming normal (fan out, ReLU) for the conv, weight 1 and bias 0 for the norm.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # mmseg's BaseDecodeHead.init_weights
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """UperNet decode head (arXiv 1807.10221) on four levels of ``in_channels`` channels each."""

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)) for s in pool_scales)
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(in_channels, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = ConvModule(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        top = feats[-1]  # (B, C, H/32, W/32)
        pooled = [_resize(psp(top), top.shape[2:]) for psp in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(3, 0, -1):  # top-down: each level gets the coarser one added
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[3]]
        outs = [outs[0]] + [_resize(x, outs[0].shape[2:]) for x in outs[1:]]  # all at 1/4
        fused = self.fpn_bottleneck(torch.cat(outs, dim=1))  # (B, channels, H/4, W/4)
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head of the reference: one 3x3 ConvModule, dropout, 1x1 classifier (no input concat)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class BeitSegmenter(nn.Module):
    """BEiT + UperNet for semantic segmentation, as the reference's ``upernet_beit_*`` configs.

    ``forward(images)`` gives logits at 1/4 of the input (patch 16), ``(B, num_classes, H/4, W/4)``; in training
    mode it gives ``(logits, aux_logits)``, the auxiliary ones at 1/16. :func:`segmentation_loss` turns either
    into the training loss.

    Args:
        spec: zoo entry of the backbone.
        num_classes: segmentation classes (150 for ADE20K with ``reduce_zero_label``).
        img_size: crop size in px the model is built for (512 or 640); the only input size it accepts.
        drop_path: stochastic depth rate of the last block (0.1 base, 0.2 large in the reference).
        layer_scale: initial layer-scale gamma; default the spec's (overwritten by pretrained weights).
        channels: UperNet width; default the embedding width (768 base, 1024 large, as the reference).
        aux_channels: width of the auxiliary FCN head (256).
        out_indices: the four blocks that feed the pyramid; default :func:`feature_indices` of the depth.
        pool_scales: pyramid pooling output sizes.
        dropout: dropout before both classifiers.
    """

    def __init__(self, spec: BeitSpec, num_classes: int, img_size: int = 512, drop_path: float = 0.1,
                 layer_scale: Optional[float] = None, channels: Optional[int] = None, aux_channels: int = 256,
                 out_indices: Optional[Sequence[int]] = None, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        if img_size % (2 * spec.patch_size):
            raise ValueError(f"img_size={img_size} must be a multiple of {2 * spec.patch_size} (twice the patch): "
                             "the 1/32 level halves the token grid")
        out_indices = list(feature_indices(spec.depth) if out_indices is None else out_indices)
        if len(out_indices) != 4 or out_indices != sorted(set(out_indices)) or out_indices[-1] != spec.depth - 1:
            raise ValueError(f"out_indices={out_indices} must be 4 increasing block indices ending with the last "
                             f"block, {spec.depth - 1}; e.g. {feature_indices(spec.depth)}")
        self.spec, self.num_classes, self.img_size, self.out_indices = spec, num_classes, img_size, out_indices
        kwargs = classifier_kwargs(spec, num_classes=0, img_size=img_size, drop_path=drop_path,
                                   layer_scale=layer_scale)
        self.backbone = Beit(**kwargs)
        self.backbone.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True)  # no norm, fc_norm

        dim = spec.embed_dim
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.decode_head = UperHead(dim, channels or dim, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(dim, aux_channels, num_classes, dropout)

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks (``engine.layer_decay`` reads the depth from ``model.blocks``)."""
        return self.backbone.blocks

    def pyramid(self, images: Tensor) -> list[Tensor]:
        """The four adapter outputs, ``(B, D, H/4, W/4)`` ... ``(B, D, H/32, W/32)`` for patch 16."""
        size = self.img_size
        if images.ndim != 4 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images of shape {tuple(images.shape)}: this model takes (B, 3, {size}, {size}); "
                             "run larger or smaller images through slide_inference(model, ..., crop=img_size)")
        feats = self.backbone.forward_intermediates(images, indices=self.out_indices, intermediates_only=True)
        return [fpn(x) for fpn, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]

    def forward(self, images: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        feats = self.pyramid(images)
        logits = self.decode_head(feats)  # (B, K, H/4, W/4)
        if self.training:
            return logits, self.auxiliary_head(feats[2])  # aux (B, K, H/16, W/16)
        return logits

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """:func:`segmentation_loss` of ``self(images)`` (training mode adds the auxiliary term)."""
        return segmentation_loss(self(images), labels)

    def layer_id(self, name: str) -> int:
        """Layer id of parameter ``name`` for layer-wise lr decay: see :func:`segmenter_layer_id`."""
        return segmenter_layer_id(name, len(self.backbone.blocks))

    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay names ([CLS], relative position tables), prefixed with ``backbone.``."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def load_backbone(self, state_dict) -> None:
        """Load pretrained BEiT weights into the backbone, strictly.

        Accepts what :func:`beit_scale.models.convert.mim_to_timm_backbone` accepts: our pretraining (BeitMIM)
        or classifier state dicts, timm's, or a reference release (shared table expanded per block). Tables of
        another window (224 px pretraining) are interpolated to this model's (``img_size / patch``), the head,
        ``norm`` and ``fc_norm`` dropped; adapters and heads keep their initialisation.
        """
        sd = mim_to_timm_backbone(state_dict, self.spec, img_size=self.img_size)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc_norm.")}
        self.backbone.load_state_dict(sd, strict=True)
        log.info("backbone weights loaded (%d tensors) for %d px crops", len(sd), self.img_size)


def segmenter_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a :class:`BeitSegmenter` parameter, as the reference's ``LayerDecayOptimizerConstructor``.

    0 for the backbone's embeddings (patch embedding, [CLS]); i+1 for ``backbone.blocks.i``; ``num_layers + 1``
    for the adapters and both heads. The lr scale is then ``decay ** (num_layers + 1 - id)``.

    Raises:
        ValueError: a name outside this layout, or a block index >= ``num_layers``.
    """
    if name.startswith("backbone."):
        rest = name[len("backbone."):]
        if rest in _EMBEDDINGS or rest.startswith(_EMBEDDING_MODULES):
            return 0
        if m := _BLOCK.match(rest):
            if int(m.group(1)) >= num_layers:
                raise ValueError(f"parameter {name!r} is in block {m.group(1)} but the model has {num_layers} blocks")
            return int(m.group(1)) + 1
    elif name.startswith(_AFTER_BACKBONE):
        return num_layers + 1
    raise ValueError(f"parameter {name!r} has no layer id; add its prefix to beit_scale.models.segmentation")


def segmentation_loss(outputs: Union[Tensor, tuple[Tensor, Tensor]], labels: Tensor, aux_weight: float = 0.4,
                      ignore_index: int = IGNORE_INDEX) -> dict[str, Tensor]:
    """Cross-entropy at the labels' resolution: main + ``aux_weight`` x auxiliary, as mmseg 0.11 computes it.

    Logits are upsampled bilinearly (``align_corners=False``) to ``labels`` ``(B, H, W)``; pixels labelled
    ``ignore_index`` add nothing. Like mmseg 0.11 (before its ``avg_non_ignore``), the sum is divided by all
    ``B * H * W`` pixels, ignored ones included, so a crop of padding alone gives 0, not NaN.

    Returns:
        ``{"loss", "loss_main", "loss_aux" (when aux logits are given)}``, float32 scalars.
    """
    logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
    labels = labels.long()

    def ce(x: Tensor) -> Tensor:
        x = _resize(x.float(), labels.shape[-2:])
        return F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="sum") / labels.numel()

    out = {"loss_main": ce(logits)}
    out["loss"] = out["loss_main"]
    if aux is not None:
        out["loss_aux"] = ce(aux)
        out["loss"] = out["loss_main"] + aux_weight * out["loss_aux"]
    return out


def _pair(x: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def window_boxes(height: int, width: int, crop: Union[int, Sequence[int]],
                 stride: Union[int, Sequence[int]]) -> list[tuple[int, int, int, int]]:
    """The ``(y1, y2, x1, x2)`` windows of mmseg's slide mode: a grid of ``stride`` steps whose last row and
    column are shifted back to end at the border; a side shorter than the crop gives one window of that side."""
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop), _pair(stride)
    if min(crop_h, crop_w, stride_h, stride_w) < 1 or stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"crop={crop} and stride={stride} must be positive with stride <= crop (no gaps)")
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return boxes


def _logits(model: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    out = model(images)
    return out[0] if isinstance(out, tuple) else out


def slide_inference(model: Callable[[Tensor], Tensor], images: Tensor, num_classes: int,
                    crop: Union[int, Sequence[int]], stride: Union[int, Sequence[int]],
                    out_size: Optional[Sequence[int]] = None) -> Tensor:
    """mmseg's 'slide' test mode: logits of overlapping ``crop`` windows, summed and divided by their count.

    Each window's logits are upsampled to the window (bilinear, ``align_corners=False``). A window smaller than
    ``crop`` (an image side shorter than the crop) is padded bottom-right with 0, the normalised mean pixel that
    training pads with, and the logits of the padding are cut off. The reference uses crop 512, stride 341.
    Call under ``torch.no_grad()`` with the model in eval mode.

    Args:
        model: ``images (B, 3, crop_h, crop_w) -> logits (B, num_classes, h, w)`` at any resolution.
        images: normalised ``(B, 3, H, W)``.
        num_classes: channels of the logits.
        crop, stride: window size and step in px, an int or ``(h, w)``.
        out_size: ``(H', W')`` to resize the result to (the original image's size); default ``(H, W)``.

    Returns:
        float32 logits ``(B, num_classes, H', W')``.
    """
    crop_h, crop_w = _pair(crop)
    batch, _, height, width = images.shape
    logits = images.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in window_boxes(height, width, crop, stride):
        window = images[:, :, y1:y2, x1:x2]
        h, w = y2 - y1, x2 - x1
        if (h, w) != (crop_h, crop_w):
            window = F.pad(window, (0, crop_w - w, 0, crop_h - h))
        out = _resize(_logits(model, window).float(), (crop_h, crop_w))[:, :, :h, :w]
        logits[:, :, y1:y2, x1:x2] += out
        count[:, :, y1:y2, x1:x2] += 1
    logits /= count
    return logits if out_size is None else _resize(logits, out_size)


def whole_inference(model: Callable[[Tensor], Tensor], images: Tensor,
                    out_size: Optional[Sequence[int]] = None) -> Tensor:
    """mmseg's 'whole' test mode: one forward of the whole image, logits upsampled to ``out_size`` (default the
    input's). A BEiT segmenter only takes its own ``img_size``; use :func:`slide_inference` for other sizes."""
    logits = _logits(model, images).float()
    return _resize(logits, images.shape[-2:] if out_size is None else out_size)
