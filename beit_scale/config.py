"""Typed run configuration: a frozen dataclass tree loaded from YAML recipes with dotted overrides.

Every job (`train-tokenizer`, `pretrain`) reads one :class:`Config`. Each part of the code receives only its
slice (``cfg.optim``, ``cfg.masking``...). Unknown keys, wrong types and impossible combinations raise
``ValueError`` naming the field and the fix, before any process group starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from beit_scale.jobs import JOB_NAMES

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPE_DIR = PACKAGE_DIR / "recipes"
QUICKSTART_DIR = RECIPE_DIR / "quickstart"  # what `beit-scale quickstart` runs, not a job's recipe
PROJECT_ROOT = PACKAGE_DIR.parent  # a checkout's root (launch/, benchmarks/); site-packages after a plain install


@dataclass(frozen=True)
class RunConfig:
    job: Literal[JOB_NAMES] = "pretrain"  # which job reads this recipe (beit_scale/jobs.py)
    name: str = "run"  # tag of the run, e.g. pt22k
    output_dir: str = "runs/default"  # folder for config, logs, TensorBoard, checkpoints and summary
    seed: int = 0  # seeds weights, data order, augmentation and masks


@dataclass(frozen=True)
class ModelConfig:
    name: str = "beit_base_patch16_224"  # zoo name, see `beit-scale models`
    img_size: Optional[int] = None  # px of the patch view; None keeps the zoo's
    drop_path: float = 0.1  # stochastic depth rate of the last block (linear in depth)
    layer_scale: Optional[float] = None  # initial layer-scale gamma; None keeps the zoo's (0.1 base, 1e-5 large)
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory


@dataclass(frozen=True)
class TokenizerConfig:
    path: str = ""  # trained tokenizer file (pretraining reads it; train-tokenizer writes into output_dir)
    vocab_size: int = 8192  # number of visual tokens (train-tokenizer only; pretraining reads it from path)
    input_size: int = 112  # px of the tokenizer view
    downsample: int = 8  # tokenizer view px per token
    hidden_dim: int = 64  # conv channels at full resolution
    codebook_dim: int = 512  # width of each codebook vector
    num_res_blocks: int = 1  # residual blocks per resolution stage
    kl_weight: float = 0.0  # weight of the KL term to the uniform prior
    temperature_start: float = 1.0  # Gumbel-softmax temperature at step 0
    temperature_end: float = 0.0625  # temperature reached at the end of annealing
    anneal_fraction: float = 0.8  # fraction of train.total_steps over which the temperature anneals
    recon_every: int = 0  # write reconstruction PNGs every N optimizer steps (0 = only at the end)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # pretraining labels: fp32, or autocast + fp32 bottom stage
    # train-tokenizer trains a conv dVAE (pixels, Gumbel-softmax) or BEiT v2's VQ-KD (a ViT whose cosine EMA codebook
    # is trained to predict a frozen teacher's patch features). For vqkd, downsample is the patch size and
    # codebook_dim the code width (BEiT v2: 32); hidden_dim, num_res_blocks, kl_weight and temperature_* are unused.
    kind: Literal["dvae", "vqkd"] = "dvae"
    embed_dim: int = 768  # vqkd: width of the ViT encoder and decoder
    depth: int = 12  # vqkd: encoder blocks
    num_heads: int = 12  # vqkd: attention heads per block (encoder and decoder)
    decoder_depth: int = 3  # vqkd: decoder blocks (training only; not in the tokenizer file)
    ema_decay: float = 0.99  # vqkd: codebook EMA decay per training forward
    dead_code_steps: int = 100  # vqkd: a code unused for this many micro steps restarts from a batch output; 0 = never
    commitment_weight: float = 1.0  # vqkd: weight of the commitment loss beside the cosine feature loss
    teacher: str = ""  # vqkd: local teacher weights: a beit_scale run folder or .safetensors, or a timm .safetensors
    teacher_timm_name: str = ""  # vqkd: timm model name of a timm .safetensors teacher; "" = a beit_scale source


@dataclass(frozen=True)
class MaskingConfig:
    kind: Literal["blockwise", "random"] = "blockwise"  # Algorithm 1 of the paper, or the random ablation
    # What a masked patch is asked to recover; here beside `kind`, as the paper's ablation table puts them, and in
    # the section only MIM jobs read (model is shared with fine-tuning, where a target means nothing).
    # tokens: its visual token (softmax over the tokenizer's vocabulary; needs tokenizer.path);
    # pixels: its patch-view pixels, normalised per patch (MAE's norm_pix_loss), MSE; no tokenizer is read.
    target: Literal["tokens", "pixels"] = "tokens"
    num_masked: int = 75  # masked patches per image (75 of 196 at 224 px)
    min_block_patches: int = 16  # smallest block, in patches
    min_aspect: float = 0.3  # block aspect ratio is log-uniform in [min_aspect, 1/min_aspect]


@dataclass(frozen=True)
class DataConfig:
    format: Literal["folder", "shards"] = "folder"  # root/val_root are ImageFolders, or `beit-scale shard` outputs
    root: str = ""  # training images: ImageFolder root (ROOT/<class>/<image>), or shards folder holding manifest.json
    val_root: str = ""  # held-out images for evaluation, in data.format like root; empty = none
    num_workers: int = 4  # data loader processes per rank
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop area range
    hflip: float = 0.5  # horizontal flip probability
    color_jitter: float = 0.4  # brightness, contrast and saturation strength; 0 disables
    transform: Literal["fast", "reference"] = "fast"  # training views: fast (data/fast_views.py) or TwoViewTransform
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # patch-view normalisation
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1.5e-3  # peak learning rate (absolute, for the recipe's global batch)
    min_lr: float = 1e-5  # floor of the cosine schedule
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    weight_decay: float = 0.05  # AdamW decay; biases, norms, position tables and special tokens get none
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 3.0  # max global grad norm; 0 disables clipping
    # lr after the warmup: cosine to min_lr over the remaining steps, or poly (mmseg's `poly`, segmentation):
    # min_lr + (lr - min_lr) * (1 - step / train.total_steps) ** poly_power
    schedule: Literal["cosine", "poly"] = "cosine"
    poly_power: float = 1.0  # exponent of the poly schedule (1.0: linear decay, as BEiT's segmentation)


@dataclass(frozen=True)
class TrainConfig:
    total_steps: int = 1000  # optimizer steps of the whole run
    micro_batch: int = 64  # images per rank per forward/backward
    grad_accum: int = 1  # micro batches per optimizer step
    global_batch: int = 64  # images per optimizer step = micro_batch * grad_accum * ranks
    log_every: int = 10  # optimizer steps between console/TensorBoard logs (and host syncs)
    eval_batches: int = 20  # held-out micro batches evaluated at the end (needs data.val_root)
    trace_samples: bool = False  # write the sample ids of every step per rank (proves the data order)
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a non-finite loss or gradient: skip the step everywhere, or stop
    max_consecutive_skips: int = 10  # this many skipped steps in a row stop the run
    preempt_signal: str = "USR2"  # signal (sbatch --signal=USR2@180) that saves a checkpoint and exits 75; "" = none
    preempt_check_every: int = 1  # optimizer steps between the ranks' agreement on a signal (a 1-element all-reduce)
    heartbeat_timeout: float = 300.0  # seconds without a sign of life from a rank before the job fails; 0 = off
    stall_timeout: float = 3600.0  # seconds without a finished step (e.g. a collective waiting forever); 0 = off


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000  # optimizer steps between checkpoints (one is always saved at the end); 0 = end only
    keep_last: int = 3  # committed checkpoints kept; older ones are pruned after a newer one commits
    resume: bool = True  # relaunching the same command continues from the newest complete checkpoint
    start_over: bool = False  # with resume=false on a run folder that has outputs: move them to before-<time>/ first
    allow_changes: tuple[str, ...] = ()  # fields (e.g. train.total_steps) a resume may change; others are refused
    on_damaged: Literal["fallback", "fail"] = "fallback"  # a damaged newest checkpoint: use the previous, or stop


@dataclass(frozen=True)
class EngineConfig:
    ds_config: str = "ds_configs/base.json"  # DeepSpeed JSON: ZeRO stage, offload, precision, buckets only
    zero_stage: Optional[int] = None  # override the ds_config's ZeRO stage (0-3)
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = None  # override the ds_config's (fp16: dynamic loss scale)
    compile: Optional[bool] = None  # torch.compile the model (DeepSpeed's engine.compile); default: on a GPU at ZeRO 0-2
    peak_tflops: float = 0.0  # per-device peak TFLOP/s that MFU is read against (H100 bf16 dense: 989); 0 = a matmul measured at start


@dataclass(frozen=True)
class FinetuneConfig:
    """Image classification from pretrained weights (`finetune`) and linear probing (`linprobe`)."""

    init_from: str = ""  # run folder, checkpoint step folder or .safetensors weights; "" trains from scratch
    num_classes: int = 0  # outputs of the head; 0 = the number of class folders in data.root
    train_fraction: float = 1.0  # share of each class of data.root trained on (seeded by run.seed), e.g. 0.1
    layer_decay: float = 1.0  # lr scale ratio between consecutive layers (0.65 base, 0.75 large); 1 = none
    head_init_scale: float = 0.001  # the head's trunc-normal(0.02) init is multiplied by this
    auto_augment: str = ""  # timm policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment); "" = none
    re_prob: float = 0.0  # random erasing probability per image
    mixup: float = 0.0  # mixup alpha; 0 disables
    cutmix: float = 0.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0  # probability of mixing a batch when mixup or cutmix is on
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.0  # target smoothing (also applied to the mixed targets)
    crop_pct: float = 0.875  # evaluation centre crop: shorter side resized to img_size / crop_pct
    eval_every: int = 0  # optimizer steps between top-1/top-5 evaluations on data.val_root; 0 = only at the end
    ema_decay: float = 0.0  # EMA of the weights per optimizer step, e.g. 0.9999; 0 disables (ZeRO 0-2 only)
    probe_block: int = 0  # linprobe: features after this many blocks (1-based); 0 = after the last block
    probe_norm: Literal["batchnorm", "layernorm"] = "batchnorm"  # linprobe: normalisation without affine


@dataclass(frozen=True)
class SegmentConfig:
    """Semantic segmentation (`segment`): BEiT + UperNet on data.root in the ADE20K layout
    (images/{training,validation}/<stem>.jpg, annotations/.../<stem>.png); flips use data.hflip."""

    init_from: str = ""  # pretraining/fine-tuning run or checkpoint folder, .safetensors (ours, timm's); "" = scratch
    num_classes: int = 150  # classes the model predicts (ADE20K: 150 after reduce_zero_label)
    reduce_zero_label: bool = True  # annotation 0 ("other") ignored, class c becomes c-1 (ADE20K); false: 0 is a class
    class_names: tuple[str, ...] = ()  # names of the classes for the per-class IoU; () = their indices
    crop_px: int = 512  # square training crop and model input, px (a multiple of twice the patch size)
    scale: tuple[int, int] = (2048, 512)  # (long, short) px an image is rescaled into, keeping its ratio, then cropped
    ratio_range: tuple[float, float] = (0.5, 2.0)  # training multiplies `scale` by a ratio drawn from this range
    cat_max_ratio: float = 0.75  # a crop is redrawn while one class covers this share of it; 1 = off
    photometric: bool = True  # mmseg's photometric distortion (brightness, contrast, saturation, hue)
    aux_weight: float = 0.4  # weight of the auxiliary FCN head's loss; 0 = main loss only
    channels: int = 0  # UperNet width; 0 = the backbone's embedding width (the reference's)
    aux_channels: int = 256  # width of the auxiliary FCN head
    dropout: float = 0.1  # dropout before both classifiers
    layer_decay: float = 0.9  # lr scale ratio between consecutive layers (0.9 base, 0.95 large); 1 = none
    eval_stride: int = 341  # sliding-window step in px at evaluation (341 for 512 crops, 426 for 640)
    eval_every: int = 0  # optimizer steps between mIoU evaluations on the validation split; 0 = only at the end
    eval_images: int = 0  # evaluate on the first N validation images; 0 = all of them


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)


@dataclass(frozen=True)
class QuickstartConfig:
    """`beit-scale quickstart`: how much of Fashion-MNIST to export, and the two stage recipes that train on it."""

    train_images: int = 12000  # first N of the 60,000 training images, exported to ImageFolder (labels unused)
    heldout_images: int = 1024  # first N of the 10,000 test images: held-out masked-token accuracy
    tokenizer: str = "quickstart_tokenizer"  # stage 1 recipe (train-tokenizer)
    pretrain: str = "quickstart_pretrain"  # stage 2 recipe (pretrain); its tokenizer.path is set to stage 1's


# ----------------------------------------------------------------------------------------------- loading


def list_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(recipe: str, folder: Path = RECIPE_DIR) -> Path:
    """Resolve a recipe given as a shipped name (``quickstart_pretrain``, in ``folder``) or a YAML path."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = folder / f"{path.stem if path.suffix else recipe}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ValueError(f"recipe {recipe!r} is neither a YAML file nor a shipped recipe; shipped: {', '.join(names)}")


def load_config(recipe: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a recipe (shipped name or path), apply ``a.b=value`` overrides and type-check the result.

    A recipe may name another with ``base: <recipe>``; its keys are merged over the base's.
    """
    data = _read_recipe(recipe) if recipe else {}
    _apply_overrides(data, overrides, "section.field=value, e.g. train.total_steps=100")
    return _build(Config, data, "")


def load_quickstart(recipe: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> QuickstartConfig:
    """The quickstart's own recipe (shipped in ``recipes/quickstart/``, or a YAML path) with ``field=value``
    overrides. Its sizes are checked here; the stage recipes it names are loaded and checked by the quickstart."""
    data = _read_recipe(recipe, folder=QUICKSTART_DIR)
    _apply_overrides(data, overrides, "field=value, e.g. train_images=3000")
    cfg = _build(QuickstartConfig, data, "")
    for name, available in (("train_images", 60000), ("heldout_images", 10000)):
        if not 1 <= getattr(cfg, name) <= available:
            raise ValueError(f"quickstart {name}={getattr(cfg, name)} must be in [1, {available}] "
                             f"(Fashion-MNIST's {'training' if available == 60000 else 'test'} split)")
    return cfg


def describe_quickstart(recipe: str = "default") -> str:
    """One line of what the quickstart recipe runs, with its sizes (for ``--help``)."""
    qs = load_quickstart(recipe)
    tok, pt = load_config(qs.tokenizer), load_config(qs.pretrain)
    return (f"recipe {recipe!r}: {qs.train_images} training and {qs.heldout_images} held-out Fashion-MNIST images; "
            f"tokenizer {qs.tokenizer} ({tok.train.total_steps} steps of {tok.train.global_batch}), "
            f"pretraining {qs.pretrain} ({pt.train.total_steps} steps of {pt.train.global_batch})")


def _apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], form: str) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like {form}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_first_line(err)}); quote it or "
                             "fix the brackets, e.g. optim.betas=[0.9,0.999]") from None
        _set_dotted(data, key.strip(), value)


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def _read_recipe(recipe: str, seen: tuple[Path, ...] = (), folder: Path = RECIPE_DIR) -> dict:
    path = recipe_path(recipe, folder)
    if path in seen:
        raise ValueError(f"recipe {path} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {_first_line(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"recipe {path} cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ValueError(f"recipe {path}: base={base!r} must name one recipe (a shipped name or a YAML path)")
    merged = _read_recipe(base, seen + (path,), folder)
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key}: {part!r} is a value, not a section")
    node[leaf] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known fields: {', '.join(names)}"
            raise ValueError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: any length
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r} must be a list, e.g. [a, b]")
        return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{name}={value!r} must be a list of {len(args)} numbers")
        return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be true or false")
        return value
    # Every number gets these checks by default; checks.py adds each field's own range.
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} must be an integer")
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0 (counts, sizes, steps and seeds are never negative)")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} must be a number")
        if not math.isfinite(value):
            raise ValueError(f"{name}={value} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be a string")
        return str(value)
    raise TypeError(f"config field {name} has unsupported type {tp}")  # internal: extend _coerce


# What a resume may change without being asked: logging, checkpoint and watchdog cadence, data loading, and how
# the global batch is split (a resume on another number of ranks). Everything else defines the run.
SAFE_ON_RESUME = frozenset({
    "run.output_dir", "data.num_workers", "tokenizer.recon_every",
    "train.micro_batch", "train.grad_accum", "train.log_every", "train.eval_batches", "train.trace_samples",
    "train.on_nonfinite", "train.max_consecutive_skips", "train.preempt_signal", "train.preempt_check_every",
    "train.heartbeat_timeout", "train.stall_timeout", "finetune.eval_every", "segment.eval_every",
    "segment.eval_images", "engine.compile",
    "engine.peak_tflops",
    "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.resume", "checkpoint.on_damaged",
    "checkpoint.start_over", "checkpoint.allow_changes",
})


def changed_fields(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(dotted field, saved value, value now) for each field of ``cfg`` that differs from ``saved`` (a checkpoint's
    resolved config), not counting :data:`SAFE_ON_RESUME`. Fields the saved config lacks (added by a later
    version) are not compared."""
    now = to_dict(cfg)
    out = []
    for section, fields in saved.items():
        if not isinstance(fields, dict) or not isinstance(now.get(section), dict):
            continue
        for key, old in fields.items():
            name = f"{section}.{key}"
            if key in now[section] and now[section][key] != old and name not in SAFE_ON_RESUME:
                out.append((name, old, now[section][key]))
    return out


def to_dict(cfg: Config) -> dict:
    """The config as plain YAML-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_yaml(cfg: Config, path: Path) -> None:
    """Write the resolved config; ``load_config(path)`` reads it back unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_project_path(value: str) -> Path:
    """A path from a recipe: absolute, relative to the working directory, to the package (the shipped
    ``ds_configs/``, also after a plain ``pip install``), or to the project root of a checkout."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    shipped = PACKAGE_DIR / path
    return shipped if shipped.exists() else PROJECT_ROOT / path
