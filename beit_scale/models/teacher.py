"""The frozen teacher whose patch features a VQ-KD tokenizer learns to predict, from LOCAL weights only.

``tokenizer.teacher`` names either

* a beit_scale source (``finetune.init_from``'s kinds: a run folder, a checkpoint folder, a ``.safetensors`` file
  written by ``beit-scale pretrain``, ``finetune`` or ``consolidate``), rebuilt as timm's ``Beit`` of its zoo
  model; a pretraining source keeps its final LayerNorm, so its features are the pretrained encoder's output;
* with ``tokenizer.teacher_timm_name`` set, a ``.safetensors`` state dict of that timm model (e.g. written by
  ``beit-scale export``, or saved from any timm model), loaded strictly. Nothing is downloaded.

The features are the last block's patch tokens after the model's final norm (``fc_norm`` for mean-pooling
models), prefix tokens dropped: ``(B, grid * grid, dim)``. The teacher reads the tokenizer's own view, in
``[0, 1]``, resized to its resolution when that differs and normalised with the given mean and std.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

log = logging.getLogger(__name__)

WHAT = "tokenizer.teacher"


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher source is, from metadata and tensor shapes only."""

    path: Path
    name: str  # timm model name (teacher_timm_name) or the zoo name a beit_scale source was trained as
    img_size: int  # px the teacher reads
    patch_size: int  # px per patch side

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


def _meta_and_shapes(path: Path) -> tuple[dict, dict[str, list[int]]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{WHAT}={str(path)!r} is not a readable safetensors file: {err}") from None


def _timm_model(name: str, device: str, **kwargs) -> nn.Module:
    import timm

    try:
        with torch.device(device):
            return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model"
        raise ValueError(f"tokenizer.teacher_timm_name={name!r}: {err}") from None


def describe_teacher(path: str | Path, timm_name: str = "") -> TeacherSpec:
    """Resolve the teacher without reading its tensors (cheap: the config checks call it)."""
    from beit_scale.checkpoint.export import describe_source
    from beit_scale.models.zoo import get_spec

    path = Path(path)
    if timm_name:
        if not path.is_file() or path.suffix != ".safetensors":
            raise ValueError(f"{WHAT}={str(path)!r} must be a .safetensors file of timm's {timm_name} (never a "
                             "pickle, never a download); write one with `beit-scale export` or safetensors' save_file")
        meta, _ = _meta_and_shapes(path)
        sized = {"img_size": int(meta["img_size"])} if meta.get("img_size", "").isdigit() else {}
        model = _timm_model(timm_name, "meta", num_classes=0, **sized)
        embed = getattr(model, "patch_embed", None)
        if embed is None or not hasattr(embed, "img_size"):
            raise ValueError(f"tokenizer.teacher_timm_name={timm_name!r} has no ViT patch embedding; the teacher must "
                             "be a ViT-style model (patch tokens on a square grid)")
        return TeacherSpec(path, timm_name, int(embed.img_size[0]), int(embed.patch_size[0]))
    source = describe_source(path, WHAT)
    if not source.model:
        raise ValueError(f"{WHAT}={str(path)!r} does not record the zoo model it was trained as; export it with "
                         "`beit-scale export --model ...` and set tokenizer.teacher_timm_name")
    patch = get_spec(source.model).patch_size
    if source.kind == "weights":
        _, shapes = _meta_and_shapes(source.path)
        tables = [s for k, s in shapes.items() if k.endswith("relative_position_bias_table")]
        side = math.isqrt(max(tables[0][0] - 3, 0)) if tables else 0
        if side < 1 or side * side != tables[0][0] - 3:
            raise ValueError(f"{WHAT}={str(path)!r} holds no BEiT relative position table of a square patch grid")
        return TeacherSpec(source.path, source.model, (side + 1) // 2 * patch, patch)
    from beit_scale.checkpoint.files import meta_file

    model_cfg = json.loads(meta_file(source.path).read_text()).get("config", {}).get("model", {})
    return TeacherSpec(source.path, source.model, model_cfg.get("img_size") or get_spec(source.model).img_size, patch)


def check_teacher_grid(spec: TeacherSpec, grid_size: int, input_size: int) -> None:
    """The teacher's patch grid must be the tokenizer's: one feature per token."""
    if spec.grid_size != grid_size:
        raise ValueError(f"{WHAT}={str(spec.path)!r} ({spec.name}, {spec.img_size} px / patch {spec.patch_size}) has a "
                         f"{spec.grid_size}x{spec.grid_size} patch grid but the tokenizer has {grid_size}x{grid_size} "
                         f"({input_size} px / tokenizer.downsample); pick a teacher with a {grid_size}x{grid_size} grid "
                         f"or set tokenizer.input_size and tokenizer.downsample to give {spec.grid_size}x"
                         f"{spec.grid_size} tokens")


class FeatureTeacher(nn.Module):
    """A frozen model as a ``(B, 3, S, S)`` ``[0, 1]`` pixels -> ``(B, grid * grid, dim)`` patch-feature map."""

    def __init__(self, model: nn.Module, spec: TeacherSpec, mean, std) -> None:
        super().__init__()
        self.model, self.spec = model.eval().requires_grad_(False), spec
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        norm = getattr(model, "fc_norm", None)
        self.final_norm = norm if norm is not None and not isinstance(norm, nn.Identity) else None
        self.feature_dim = int(model.num_features)

    @property
    def grid_size(self) -> int:
        return self.spec.grid_size

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen: no dropout, no drop path

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        size = self.spec.img_size
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens:]  # (B, N, C)
        return self.final_norm(tokens) if self.final_norm is not None else tokens


def _beit_scale_model(spec: TeacherSpec) -> tuple[nn.Module, dict[str, Tensor]]:
    from timm.models.beit import Beit

    from beit_scale.checkpoint.export import describe_source, load_source, timm_state_dict
    from beit_scale.models.classifier import classifier_kwargs
    from beit_scale.models.convert import SHARED_TABLE, mim_to_timm_backbone
    from beit_scale.models.zoo import get_spec

    state = load_source(describe_source(spec.path, WHAT))
    zoo = get_spec(spec.name)
    if SHARED_TABLE in state or "lm_head.weight" in state or "pixel_head.weight" in state:
        sd = mim_to_timm_backbone(state, zoo, spec.img_size, global_pool="")  # keeps the pretraining final norm
        return Beit(**classifier_kwargs(zoo, 0, spec.img_size, drop_path=0.0, global_pool="")), sd
    sd, num_classes, _ = timm_state_dict(state, spec.name)
    return Beit(**classifier_kwargs(zoo, num_classes, spec.img_size, drop_path=0.0)), sd


def load_teacher(path: str | Path, timm_name: str = "", mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225)) -> FeatureTeacher:
    """Build the frozen teacher (on the CPU, fp32) from local weights; see the module docstring."""
    from safetensors.torch import load_file

    spec = describe_teacher(path, timm_name)
    if timm_name:
        sd = load_file(str(spec.path))
        head = sd.get("head.weight")
        model = _timm_model(timm_name, "cpu", num_classes=0 if head is None else head.shape[0], img_size=spec.img_size)
    else:
        model, sd = _beit_scale_model(spec)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:600]
        raise ValueError(f"{WHAT}={str(path)!r}: the weights do not load strictly into {spec.name} at {spec.img_size} "
                         f"px: {text}") from None
    log.info("teacher %s from %s: %d px, %dx%d patches, %d-dim features", spec.name, spec.path, spec.img_size,
             spec.grid_size, spec.grid_size, int(model.num_features))
    return FeatureTeacher(model, spec, mean, std)
