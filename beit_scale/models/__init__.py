"""Model zoo and the MIM model; plain PyTorch on timm's BEiT blocks."""
from beit_scale.models.classifier import build_classifier, classifier_kwargs
from beit_scale.models.convert import (from_timm_state_dict, mim_to_classifier_state_dict, mim_to_timm_backbone,
                                       to_timm_state_dict)
from beit_scale.models.mim import BeitMIM, backbone_param_count, masked_positions
from beit_scale.models.probe import LinearProbe
from beit_scale.models.zoo import ZOO, BeitSpec, get_spec

__all__ = ["ZOO", "BeitSpec", "BeitMIM", "backbone_param_count", "get_spec", "build_mim_model", "masked_positions",
           "build_classifier", "classifier_kwargs", "from_timm_state_dict", "mim_to_classifier_state_dict",
           "mim_to_timm_backbone", "to_timm_state_dict", "LinearProbe"]


def build_mim_model(cfg, vocab_size: int, target: str = "tokens") -> BeitMIM:
    """Build the MIM model from ``cfg.model`` (a ModelConfig) for a tokenizer with ``vocab_size`` tokens, or with the
    pixel head for ``target='pixels'`` (``masking.target``; ``vocab_size`` unused)."""
    model = BeitMIM(get_spec(cfg.name), vocab_size, cfg.img_size, cfg.drop_path, cfg.layer_scale, target)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model
