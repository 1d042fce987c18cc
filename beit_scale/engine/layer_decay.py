"""Layer-wise learning-rate decay for BEiT fine-tuning (arXiv 2106.08254, appendix), on timm's param groups.

Layer ids of a model with L blocks: 0 for the embeddings ([CLS], [M], patch embedding, position tables shared
by all blocks), i+1 for ``blocks.i``, L+1 for what follows the blocks (final ``norm``, ``fc_norm``, ``head``).
A group's ``lr_scale`` is ``layer_decay ** (L + 1 - layer_id)``; the schedule multiplies the lr by it.

The groups come from ``timm.optim.param_groups_layer_decay``. That function reads the layer of each parameter
from ``model.group_matcher()``; for timm's BEiT classifier it gives exactly the ids above, but not for every
BEiT: timm puts ``mask_token`` at the top with the head, and the final ``norm`` (``global_pool=''``, BeitMIM)
in the last block's layer.
So it is handed the model behind a matcher that answers :func:`layer_id_of`, the single definition of the ids
for timm's BEiT; a model with another layout around the blocks (the segmenter) answers with its own
``model.layer_id(name)``, which follows the same numbering.
It does not read ``model.no_weight_decay()`` itself (timm's optimizer factory does); we pass it, as that does.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator, Sequence

from timm.optim import param_groups_layer_decay
from torch import nn

_EMBEDDINGS = ("cls_token", "mask_token", "pos_embed")
_EMBEDDING_MODULES = ("patch_embed.", "rel_pos_bias.")
_AFTER_BLOCKS = ("norm.", "fc_norm.", "head.", "lm_head.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def layer_id_of(name: str, num_layers: int) -> int:
    """Layer id of parameter ``name`` in a BEiT with ``num_layers`` blocks (see the module docstring).

    Raises:
        ValueError: a name outside the BEiT layout (a new module needs an explicit place here, not a silent
            top-layer lr) or a block index >= ``num_layers``.
    """
    if name in _EMBEDDINGS or name.startswith(_EMBEDDING_MODULES):
        return 0
    if m := _BLOCK.match(name):
        block = int(m.group(1))
        if block >= num_layers:
            raise ValueError(f"parameter {name!r} is in block {block} but the model has {num_layers} blocks")
        return block + 1
    if name.startswith(_AFTER_BLOCKS):
        return num_layers + 1
    raise ValueError(f"parameter {name!r} has no BEiT layer id; add its prefix to beit_scale.engine.layer_decay")


def _layer_ids(model: nn.Module, num_layers: int) -> Callable[[str], int]:
    """``model.layer_id`` where the model defines its own layout (e.g. the segmenter's adapters and heads),
    else :func:`layer_id_of`."""
    own = getattr(model, "layer_id", None)
    return own if own is not None else (lambda name: layer_id_of(name, num_layers))


class _LayerIdMatcher:
    """The two things param_groups_layer_decay reads from a model, with the layer ids of :func:`_layer_ids`."""

    def __init__(self, model: nn.Module, num_layers: int):
        self._model = model
        self._layer_id = _layer_ids(model, num_layers)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self._model.named_parameters()

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        return self._layer_id


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Optimizer groups by (layer, decay or not), with layer-wise lr scales.

    Weight decay is off for 1-D parameters (biases, norms, layer-scale gammas) and for ``model.no_weight_decay()``
    ([CLS], [M], position tables), on for every other weight.

    Args:
        model: a timm ``Beit`` (the classifier, or ``BeitMIM``) with ``blocks``, or a model with ``blocks`` and
            its own ``layer_id(name)`` (``BeitSegmenter``).
        weight_decay: AdamW decay of the decayed groups.
        layer_decay: ratio between the lr scales of consecutive layers (e.g. 0.65 for base, 0.75 for large).

    Returns:
        Groups for ``torch.optim`` or DeepSpeed: ``params``, ``weight_decay``, ``lr_scale`` and ``layer_id`` (int),
        in parameter order; no parameter names. Frozen parameters (``requires_grad=False``) are left out.
    """
    if not 0.0 < layer_decay <= 1.0 or weight_decay < 0:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1] and weight_decay={weight_decay} >= 0")
    num_layers = len(model.blocks)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_layer_decay(
        _LayerIdMatcher(model, num_layers),
        weight_decay=weight_decay,
        no_weight_decay_list=sorted(skip),
        layer_decay=layer_decay,
    )
    name_of = {id(p): n for n, p in model.named_parameters()}
    layer_id = _layer_ids(model, num_layers)
    for group in groups:
        group.pop("param_names", None)  # optimizers must not receive names; timm keeps them out today
        ids = {layer_id(name_of[id(p)]) for p in group["params"]}
        assert len(ids) == 1, f"one timm group mixes layers {sorted(ids)}"
        group["layer_id"] = ids.pop()
        # timm renumbers layers densely; every BEiT layer has parameters, so its numbering is ours
        assert group["lr_scale"] == layer_decay ** (num_layers + 1 - group["layer_id"]), group["layer_id"]
    return groups


def param_names_per_group(model: nn.Module, groups: Sequence[dict]) -> list[list[str]]:
    """The parameter names of each group (by identity with ``model``'s parameters), for logs and tests."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in groups]


def format_group_table(groups: Sequence[dict], names_per_group: Sequence[Sequence[str]]) -> str:
    """A plain-text table of the groups, to log once at start.

    Columns: layer, lr scale, weight decay, number of tensors, number of parameters, first tensor's name;
    a last line gives the totals.
    """
    if len(groups) != len(names_per_group):
        raise ValueError(f"{len(groups)} groups but {len(names_per_group)} name lists")
    header = f"{'layer':>5}  {'lr scale':>10}  {'weight decay':>12}  {'tensors':>7}  {'parameters':>13}  first tensor"
    lines = [header, "-" * len(header)]
    total_tensors = total_params = 0
    for group, names in zip(groups, names_per_group):
        num_params = sum(p.numel() for p in group["params"])
        total_tensors += len(group["params"])
        total_params += num_params
        lines.append(f"{group['layer_id']:>5}  {group['lr_scale']:>10.4g}  {group['weight_decay']:>12.4g}  "
                     f"{len(group['params']):>7}  {num_params:>13,}  {names[0] if names else ''}")
    lines.append(f"{'all':>5}  {'':>10}  {'':>12}  {total_tensors:>7}  {total_params:>13,}")
    return "\n".join(lines)
