"""Weight adapters: BEiT pretraining checkpoints into fine-tuning classifiers and timm models.

Conventions are those of the BEiT reference fine-tuning code (arXiv 2106.08254):

* The pretraining model shares one relative position bias table (``rel_pos_bias.relative_position_bias_table``)
  across blocks; the classifier has one per block, each initialised with a copy of the shared table.
* A table whose window differs from the model's (fine-tuning at 384 px after 224 px pretraining) is resized
  with timm's ``resize_rel_pos_bias_table`` (the reference code's geometric-progression interpolation; the three
  [CLS] entries are kept as they are), the same call timm's ``beit.checkpoint_filter_fn`` makes.
* The MIM head (``lm_head``, or ``pixel_head`` of a ``masking.target=pixels`` run), the [M] embedding
  (``mask_token``) and the pretraining final ``norm`` are dropped:
  the classifier mean-pools the patch tokens and normalises with a fresh ``fc_norm``, as the reference does.
  Copying ``norm`` into ``fc_norm`` would not carry the pretrained function over (LN of a mean is not the mean
  of LNs) and would depart from the published recipe.
* A classifier checkpoint (intermediate fine-tuning: 22k labels, then 1k) keeps its ``fc_norm``; its head is
  dropped when the number of classes differs, and its per-block tables are resized when the resolution differs.

The classifier is timm's own ``Beit`` module, so parameter names are timm's; only the non-persistent buffers
(``relative_position_index``, ``k_bias``) that timm rebuilds at construction and that older checkpoints (the
reference release) still carry need handling.
"""
from __future__ import annotations

import logging
import re
from typing import Mapping, Optional

import torch
from timm.layers import resize_rel_pos_bias_table
from timm.models.beit import Beit
from torch import nn

from beit_scale.models.classifier import classifier_kwargs
from beit_scale.models.zoo import BeitSpec

log = logging.getLogger(__name__)

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
# Buffers timm's Beit registers with persistent=False (rebuilt at construction): never in its state dict.
NON_PERSISTENT_BUFFERS = ("relative_position_index", "k_bias")
# Pretraining-only keys, dropped when the target model has no such parameter.
PRETRAINING_ONLY = ("lm_head.", "pixel_head.", "mask_token", "norm.")
# Classifier-only keys: left at the target's init when the checkpoint lacks them, dropped when the target lacks them.
CLASSIFIER_ONLY = ("fc_norm.", "head.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")

StateDict = Mapping[str, torch.Tensor]


def _is_non_persistent(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in NON_PERSISTENT_BUFFERS


def from_timm_state_dict(sd: StateDict) -> dict[str, torch.Tensor]:
    """A timm ``Beit`` state dict (or a reference-release checkpoint) as our classifier's state dict.

    Keys are identical (our classifier is timm's module). Unwraps ``{'model': sd}`` / ``{'module': sd}`` as timm's
    ``checkpoint_filter_fn`` does, and drops the non-persistent buffers that older checkpoints saved.
    """
    sd = sd.get("model", sd)
    sd = sd.get("module", sd)
    return {k: v for k, v in sd.items() if not _is_non_persistent(k)}


def to_timm_state_dict(sd: StateDict) -> dict[str, torch.Tensor]:
    """Our classifier's state dict as one that loads strictly into ``timm.create_model('beit_*', num_classes=K)``.

    Identity on keys and values; a pretraining (BeitMIM) state dict is refused, since it needs the conversion of
    :func:`mim_to_timm_backbone` (shared table expansion, head drop).
    """
    mim = sorted(k for k in sd if k == SHARED_TABLE or k.startswith(("lm_head.", "pixel_head.", "mask_token")))
    if mim:
        raise ValueError(f"{mim} belong to a pretraining (BeitMIM) state dict; convert it with "
                         "mim_to_timm_backbone(sd, spec) or mim_to_classifier_state_dict(sd, classifier)")
    return {k: v for k, v in sd.items() if not _is_non_persistent(k)}


def mim_to_classifier_state_dict(mim_sd: StateDict, classifier: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a pretraining (BeitMIM) or classifier state dict into one that loads strictly into ``classifier``.

    Args:
        mim_sd: the pretrained weights (our safetensors file, or a BEiT reference-release checkpoint); a
            classifier state dict is also accepted (intermediate fine-tuning).
        classifier: the target, e.g. from :func:`beit_scale.models.classifier.build_classifier`. Its current
            ``fc_norm`` and ``head`` values are used where the checkpoint has none (or a head of another size).

    Returns:
        A full state dict for ``classifier``, in its key order; the expected drops are logged at INFO.

    Raises:
        ValueError: any other missing or unexpected key, or a shape mismatch (e.g. another patch size or width).
    """
    fresh = {k: v.detach().clone() for k, v in classifier.state_dict().items() if k.startswith(CLASSIFIER_ONLY)}
    return _convert(mim_sd, classifier, fresh)


def mim_to_timm_backbone(
    mim_sd: StateDict, spec: BeitSpec, img_size: Optional[int] = None, global_pool: str = "avg"
) -> dict[str, torch.Tensor]:
    """Pretrained weights for a head-less timm BEiT: ``timm.create_model('beit_base_patch16_224', num_classes=0)``.

    ``global_pool='avg'`` (timm's default, the fine-tuning setting): the pretraining ``norm`` is dropped and
    ``fc_norm`` is a fresh LayerNorm (weight 1, bias 0), exactly where BEiT fine-tuning starts.
    ``global_pool=''`` (``create_model(..., num_classes=0, global_pool='')``): ``norm`` is kept, so
    ``forward_features`` reproduces the pretrained encoder's token features exactly.
    The result needs no further filtering: timm's ``beit.checkpoint_filter_fn`` leaves it unchanged.

    Args:
        mim_sd: BeitMIM state dict.
        spec: zoo entry of the backbone.
        img_size: target resolution in px (default the spec's); tables are resized to its window.
        global_pool: ``'avg'`` or ``''``, as passed to timm.
    """
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r} must be 'avg' (fresh fc_norm) or '' (pretraining norm kept)")
    with torch.device("meta"):
        target = Beit(**classifier_kwargs(spec, num_classes=0, img_size=img_size, global_pool=global_pool))
    dtype = next(iter(mim_sd.values())).dtype
    fresh = {"fc_norm.weight": torch.ones(spec.embed_dim, dtype=dtype),
             "fc_norm.bias": torch.zeros(spec.embed_dim, dtype=dtype)}  # nn.LayerNorm's own init
    return _convert(mim_sd, target, fresh)


def _convert(sd: StateDict, target: nn.Module, fresh: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``sd`` onto ``target``'s keys and shapes; ``fresh`` fills classifier-only keys the checkpoint lacks."""
    expected = {k: v.shape for k, v in target.state_dict().items()}
    sd = from_timm_state_dict(sd)

    if SHARED_TABLE in sd:
        table = sd.pop(SHARED_TABLE)
        blocks = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
        for i in blocks:
            key = f"blocks.{i}.attn.relative_position_bias_table"
            if key in sd:
                raise ValueError(f"checkpoint has both the shared {SHARED_TABLE} and the per-block {key}; "
                                 "it is not a BEiT pretraining or fine-tuning checkpoint")
            sd[key] = table
        log.info("shared relative position table %s copied into the %d blocks", tuple(table.shape), len(blocks))

    resized: dict[int, torch.Tensor] = {}  # the shared table is resized once, not once per block
    for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
        v, shape = sd[k], expected.get(k)
        if shape is None or v.shape == shape:
            continue
        if v.ndim != 2 or v.shape[1] != shape[1]:
            raise ValueError(f"checkpoint {k} has shape {tuple(v.shape)}; a relative position table is (positions, "
                             f"heads) and this model has {shape[1]} heads, {tuple(shape)}: the file is damaged or "
                             "comes from another model")
        if id(v) not in resized:
            window = target.get_submodule(k.rsplit(".", 1)[0]).window_size
            resized[id(v)] = resize_rel_pos_bias_table(v, new_window_size=window, new_bias_shape=tuple(shape))
            log.info("relative position table %s resized to %s for window %s", tuple(v.shape), tuple(shape), window)
        sd[k] = resized[id(v)]
    for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
        sd[k] = sd[k].clone()  # no aliasing between blocks (safetensors refuses shared storage)

    dropped = [k for k in sd if k not in expected and k.startswith(PRETRAINING_ONLY + CLASSIFIER_ONLY)]
    if dropped:
        log.info("dropped from the checkpoint (not in this model): %s", dropped)
    other_head = [k for k in sd if k.startswith("head.") and k in expected and sd[k].shape != expected[k]]
    if other_head:
        log.info("checkpoint head dropped, the number of classes differs: %s",
                 [f"{k} {tuple(sd[k].shape)} vs model {tuple(expected[k])}" for k in other_head])
    for k in dropped + other_head:
        del sd[k]

    filled = [k for k in expected if k not in sd and k.startswith(CLASSIFIER_ONLY) and k in fresh]
    for k in filled:
        sd[k] = fresh[k]
    if filled:
        log.info("left at the model's initialisation: %s", filled)

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
                  for k in expected if k in sd and sd[k].shape != expected[k]]
    if missing or unexpected or mismatched:
        msg = f"checkpoint does not match model: missing {missing}, unexpected {unexpected}"
        if mismatched:
            msg += f", shape mismatch {mismatched}"
        raise ValueError(msg)
    return {k: sd[k] for k in expected}
