"""The BEiT image classifier for fine-tuning: timm's ``Beit`` itself, configured as the BEiT paper fine-tunes.

Because the module *is* ``timm.models.beit.Beit`` (same class, same constructor arguments as timm's
``beit_*_patch16_224`` entries), its state dict loads strictly into ``timm.create_model('beit_base_patch16_224',
num_classes=K)`` and back; :mod:`beit_scale.models.convert` only has to handle pretraining checkpoints.
"""
from __future__ import annotations

from typing import Any, Optional

from timm.models.beit import Beit

from beit_scale.models.zoo import BeitSpec


def classifier_kwargs(
    spec: BeitSpec,
    num_classes: int,
    img_size: Optional[int] = None,
    drop_path: float = 0.1,
    layer_scale: Optional[float] = None,
    head_init_scale: float = 0.001,
    global_pool: str = "avg",
) -> dict[str, Any]:
    """The ``timm.models.beit.Beit`` constructor arguments of the fine-tuning model for ``spec``.

    Mean pooling of the patch tokens then ``fc_norm`` (timm's ``global_pool='avg'``, so ``norm`` is an
    ``Identity``), a relative position bias table in every block (no shared table, no absolute position
    embedding), layer scale from the spec. ``global_pool=''`` keeps the final ``norm`` on the tokens instead
    (used for head-less feature backbones).
    """
    return dict(
        img_size=img_size or spec.img_size,
        patch_size=spec.patch_size,
        num_classes=num_classes,
        global_pool=global_pool,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        drop_path_rate=drop_path,
        init_values=spec.layer_scale if layer_scale is None else layer_scale,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
        use_shared_rel_pos_bias=False,
        head_init_scale=head_init_scale,
    )


def build_classifier(
    spec: BeitSpec,
    num_classes: int,
    img_size: Optional[int] = None,
    drop_path: float = 0.1,
    layer_scale: Optional[float] = None,
    head_init_scale: float = 0.001,
) -> Beit:
    """BEiT classifier for fine-tuning (arXiv 2106.08254, section 2.5 and appendix).

    Args:
        spec: zoo entry of the backbone (see :func:`beit_scale.models.get_spec`).
        num_classes: outputs of the linear head.
        img_size: fine-tuning resolution in px (default: the spec's pretraining resolution); a larger size
            than pretraining gives larger relative position tables, filled by interpolation on conversion.
        drop_path: stochastic depth rate of the last block (linear in depth).
        layer_scale: initial layer-scale gamma; default the spec's (overwritten by pretrained weights).
        head_init_scale: the head's trunc-normal(0.02) init is multiplied by this (BEiT uses 0.001).

    Returns:
        A plain ``timm.models.beit.Beit``. Build under ``with torch.device('meta'):`` for shapes only.
    """
    return Beit(**classifier_kwargs(spec, num_classes, img_size, drop_path, layer_scale, head_init_scale))
