"""Validate a resolved Config for its job before any process group starts.

Each check raises ValueError naming the field and what to change. Nothing here imports DeepSpeed.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from beit_scale.adapters import patch_grid, tokenizer_arch_kwargs
from beit_scale.config import Config, to_dict
from beit_scale.jobs import JOBS
from beit_scale.models.zoo import get_spec


# Each field's own interval, on top of what every number gets when the config is read (finite; integers >= 0).
# A bracket includes its bound, a parenthesis excludes it. Fields of a tuple are checked element by element.
RANGES = {
    "model.img_size": "[1, inf)",
    "model.drop_path": "[0, 1)",
    "model.layer_scale": "(0, inf)",
    "tokenizer.vocab_size": "[2, inf)",
    "tokenizer.input_size": "[1, inf)",
    "tokenizer.downsample": "[1, inf)",
    "tokenizer.hidden_dim": "[1, inf)",
    "tokenizer.codebook_dim": "[1, inf)",
    "tokenizer.temperature_start": "(0, inf)",
    "tokenizer.temperature_end": "(0, inf)",
    "tokenizer.anneal_fraction": "(0, 1]",
    "tokenizer.embed_dim": "[1, inf)",
    "tokenizer.depth": "[1, inf)",
    "tokenizer.num_heads": "[1, inf)",
    "tokenizer.decoder_depth": "[1, inf)",
    "tokenizer.ema_decay": "[0, 1)",
    "tokenizer.commitment_weight": "[0, inf)",
    "masking.min_aspect": "(0, 1]",
    "data.hflip": "[0, 1]",
    "data.std": "(0, inf)",
    "optim.lr": "(0, inf)",
    "optim.eps": "(0, inf)",
    "optim.betas": "[0, 1)",
    "optim.weight_decay": "[0, inf)",
    "optim.clip_grad": "[0, inf)",  # 0 disables clipping
    "engine.peak_tflops": "[0, inf)",
    "train.total_steps": "[1, inf)",
    "train.micro_batch": "[1, inf)",
    "train.grad_accum": "[1, inf)",
    "train.global_batch": "[1, inf)",
    "train.log_every": "[1, inf)",
    "train.max_consecutive_skips": "[1, inf)",
    "train.preempt_check_every": "[1, inf)",
    "train.heartbeat_timeout": "[0, inf)",  # seconds; 0 turns it off
    "train.stall_timeout": "[0, inf)",
    "checkpoint.keep_last": "[1, inf)",
    "optim.poly_power": "(0, inf)",
    "segment.scale": "[1, inf)",  # px
    "segment.ratio_range": "(0, inf)",
    "segment.cat_max_ratio": "(0, 1]",  # 1 turns the redraw off
    "segment.aux_weight": "[0, inf)",
    "segment.aux_channels": "[1, inf)",
    "segment.dropout": "[0, 1)",
    "segment.layer_decay": "(0, 1]",
    "segment.eval_stride": "[1, inf)",
}
# Signals a scheduler sends ahead of a preemption or time limit (sbatch --signal=USR2@180). Others are refused:
# SIGCHLD, for one, arrives whenever a data-loader worker exits, and would look like a preemption.
PREEMPT_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "XCPU", "URG")


def _outside(value: float, interval: str) -> bool:
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return not (above and below)  # also true for NaN


def _check_ranges(cfg: Config) -> None:
    for name, interval in RANGES.items():
        section, field = name.split(".")
        value = getattr(getattr(cfg, section), field)
        if value is None:  # an optional field left to its default
            continue
        if any(_outside(v, interval) for v in (value if isinstance(value, tuple) else (value,))):
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"{name}={shown} must be in {interval}")
    if not cfg.run.output_dir.strip():
        raise ValueError("run.output_dir is empty; name the run's folder, e.g. run.output_dir=runs/my_run")
    _check_run_folder(cfg)
    sig = cfg.train.preempt_signal
    if sig and sig.upper().removeprefix("SIG") not in PREEMPT_SIGNALS:
        raise ValueError(f"train.preempt_signal={sig!r} is not a signal a scheduler sends before preempting a job; "
                         f"use one of {', '.join(PREEMPT_SIGNALS)} (USR2 with sbatch --signal=USR2@180), or \"\" for none")


def _check_run_folder(cfg: Config) -> None:
    """A new run (resume=false) never mixes into an earlier run's checkpoints: refused unless start_over."""
    from beit_scale.checkpoint import RunLayout
    from beit_scale.checkpoint.files import committed_tags

    c, layout = cfg.checkpoint, RunLayout(Path(cfg.run.output_dir))
    fields = [f"{section}.{key}" for section, values in to_dict(cfg).items() for key in values]
    for name in c.allow_changes:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise ValueError(f"checkpoint.allow_changes (--allow-config-change) names {name!r}, which is not a config "
                             f"field{f'; did you mean {close[0]}?' if close else ''}")
    if c.start_over and c.resume:
        raise ValueError("checkpoint.start_over=true starts a new run; set checkpoint.resume=false with it "
                         "(or drop start_over to continue the run in run.output_dir)")
    if c.resume or c.start_over or not layout.checkpoints.is_dir() or not any(layout.checkpoints.iterdir()):
        return
    newest = committed_tags(layout.checkpoints)
    raise ValueError(f"run.output_dir={cfg.run.output_dir!r} holds an earlier run's checkpoints "
                     f"({newest[0] if newest else 'incomplete ones'}); with checkpoint.resume=false a new run would "
                     "mix into them. Continue it (checkpoint.resume=true), pick another run.output_dir, or add "
                     "checkpoint.start_over=true to move its outputs to a before-<time>/ folder first")


def validate(cfg: Config, world_size: int) -> None:
    """All checks for ``cfg.run.job`` on ``world_size`` ranks."""
    _check_ranges(cfg)
    _check_batch(cfg, world_size)
    _check_optim(cfg)
    _check_data(cfg)
    from beit_scale.engine.ds_config import load_ds_config  # JSON only

    load_ds_config(cfg.engine.ds_config)
    if cfg.engine.zero_stage is not None and cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={cfg.engine.zero_stage} must be 0, 1, 2 or 3")
    grid, img = patch_grid(cfg)
    _BY_KIND[JOBS[cfg.run.job].kind](cfg, grid, img)


def _check_batch(cfg: Config, world_size: int) -> None:
    t = cfg.train
    if t.global_batch != t.micro_batch * t.grad_accum * world_size:
        fix = t.micro_batch * t.grad_accum * world_size
        raise ValueError(
            f"train.global_batch={t.global_batch} must equal train.micro_batch ({t.micro_batch}) x "
            f"train.grad_accum ({t.grad_accum}) x ranks ({world_size}) = {fix}; set train.global_batch={fix} "
            f"or change micro_batch/grad_accum"
        )


def _check_optim(cfg: Config) -> None:
    o = cfg.optim
    if not 0 <= o.min_lr <= o.lr:
        raise ValueError(f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    if not 0 <= o.warmup_steps < cfg.train.total_steps:
        raise ValueError(f"optim.warmup_steps={o.warmup_steps} must be in [0, train.total_steps={cfg.train.total_steps})")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if not d.root:
        raise ValueError("data.root is empty; set data.root=/path/to/train (ImageNet layout ROOT/<class>/<image>)")
    for name in ("root", "val_root"):
        value = getattr(d, name)
        if value and not Path(value).is_dir():
            expected = ("the folder `beit-scale shard SRC OUT` wrote (OUT, holding manifest.json)"
                        if d.format == "shards" else "the ImageNet layout ROOT/<class>/<image>")
            raise ValueError(f"data.{name}={value!r} is not a folder; expected {expected}")
        if value and d.format == "shards" and not (Path(value) / "manifest.json").is_file():
            raise ValueError(f"data.{name}={value!r} holds no manifest.json; with data.format=shards it must be the "
                             "OUT folder of a finished `beit-scale shard SRC OUT` (rerun that command to finish an "
                             "interrupted conversion), or set data.format=folder for an ImageFolder")
        if value and d.format == "folder" and (Path(value) / "manifest.json").is_file():
            raise ValueError(f"data.{name}={value!r} holds tar shards (manifest.json); set data.format=shards to read "
                             "them")
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"data.crop_scale={list(d.crop_scale)} must satisfy 0 < min <= max <= 1")


def _check_masking(cfg: Config, grid: int) -> None:
    m, num_patches = cfg.masking, grid * grid
    if not 1 <= m.num_masked < num_patches:
        raise ValueError(
            f"masking.num_masked={m.num_masked} must be >= 1 and < {num_patches} patches "
            f"({grid}x{grid} grid); BEiT masks about 40%, e.g. {round(0.4 * num_patches)}"
        )
    if m.kind == "blockwise" and not 1 <= m.min_block_patches <= m.num_masked:
        raise ValueError(f"masking.min_block_patches={m.min_block_patches} must be in [1, masking.num_masked={m.num_masked}]")


def _check_pretrain(cfg: Config, grid: int, img: int) -> None:
    _check_masking(cfg, grid)
    if cfg.masking.target == "tokens":  # pixels: no tokenizer is read, tokenizer.* is ignored (path may be empty)
        _check_tokenizer_file(cfg, grid, img)


def _check_tokenizer_file(cfg: Config, grid: int, img: int) -> None:
    from beit_scale.checkpoint.tokenizer_file import read_tokenizer_arch
    from beit_scale.tokenizers import DallEArch, check_token_grid

    if not cfg.tokenizer.path:
        raise ValueError("tokenizer.path is empty; pretraining with masking.target=tokens needs a trained tokenizer: run "
                         "`beit-scale train-tokenizer` first (or set masking.target=pixels to regress pixels instead)")
    arch = read_tokenizer_arch(cfg.tokenizer.path)
    try:
        check_token_grid(arch.input_size, arch.downsample, img, get_spec(cfg.model.name).patch_size)
    except ValueError as err:
        if not isinstance(arch, DallEArch):
            raise
        # DALL-E's view size is recorded in the converted file, not read from the config
        raise ValueError(f"{err} (tokenizer.path={cfg.tokenizer.path!r} is DALL-E's encoder converted for a "
                         f"{arch.input_size} px view: convert encoder.pkl again with `beit-scale convert-tokenizer "
                         "dall-e ... --input-size` of that size and point tokenizer.path at it)") from None


def _check_tokenizer_arch(cfg: Config, grid: int, img: int) -> None:
    from beit_scale.tokenizers import DVAEArch, check_token_grid

    if cfg.tokenizer.kind == "vqkd":
        _check_vqkd(cfg, img)
        return
    DVAEArch(**tokenizer_arch_kwargs(cfg))  # validates itself
    check_token_grid(cfg.tokenizer.input_size, cfg.tokenizer.downsample, img, get_spec(cfg.model.name).patch_size)


def _check_vqkd(cfg: Config, img: int) -> None:
    """VQ-KD: its shape, its token grid against the model's patch grid, and a local teacher with the same grid."""
    from beit_scale.adapters import vqkd_arch_kwargs
    from beit_scale.models.teacher import check_teacher_grid, describe_teacher
    from beit_scale.tokenizers import VQKDArch, check_token_grid

    t = cfg.tokenizer
    arch = VQKDArch(**vqkd_arch_kwargs(cfg))  # validates itself
    check_token_grid(t.input_size, t.downsample, img, get_spec(cfg.model.name).patch_size)
    if not t.teacher:
        raise ValueError("tokenizer.teacher is empty; tokenizer.kind=vqkd learns to predict a frozen teacher's patch "
                         "features: set tokenizer.teacher to local weights (a beit_scale run folder or .safetensors, or "
                         "a timm .safetensors with tokenizer.teacher_timm_name=<timm model name>)")
    check_teacher_grid(describe_teacher(t.teacher, t.teacher_timm_name), arch.grid_size, t.input_size)


def _class_folders(root: str, data_format: str = "folder") -> list[str]:
    """The class names of a data root: its sorted class folders, or the shards manifest's classes."""
    if data_format == "shards":
        from beit_scale.data.shards import read_manifest

        return read_manifest(root)["classes"]
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def _check_posterize(policy: str) -> None:
    """timm's increasing RandAugment posterizes to 4 - 4*m/10 bits: at magnitude 10 that is 0 bits, which
    Pillow (>= 11) rejects with a ValueError inside a data worker, hours into a run. A magnitude that can
    reach 10 (m >= 10, or any mstd noise) needs the cap mmax9."""
    parts = policy.split("-")
    if parts[0] != "rand" or "inc1" not in parts:
        return
    opts = {p.rstrip("0123456789."): p[len(p.rstrip("0123456789.")):] for p in parts[1:]}
    magnitude, noise = float(opts.get("m", 10) or 10), float(opts.get("mstd", 0) or 0)
    cap = float(opts.get("mmax", 10) or 10)
    if cap >= 10 and (magnitude >= 10 or noise > 0):
        raise ValueError(f"finetune.auto_augment={policy!r} can draw magnitude 10, where timm's increasing "
                         f"posterize asks Pillow for 0 bits and the data loader crashes; add -mmax9, e.g. "
                         f"{policy}-mmax9")


def _check_finetune(cfg: Config, grid: int = 0, img: int = 0) -> None:
    """Fine-tuning and linear probing: ranges, EMA, classes, the weights to start from."""
    f = cfg.finetune
    for name in ("train_fraction", "crop_pct"):
        if not 0 < getattr(f, name) <= 1:
            raise ValueError(f"finetune.{name}={getattr(f, name)} must be in (0, 1]")
    for name in ("re_prob", "mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(f, name) <= 1:
            raise ValueError(f"finetune.{name}={getattr(f, name)} is a probability and must be in [0, 1]")
    if not 0 < f.layer_decay <= 1:
        raise ValueError(f"finetune.layer_decay={f.layer_decay} must be in (0, 1] (0.65 base, 0.75 large; 1 = none)")
    if not 0 <= f.label_smoothing < 1 or f.mixup < 0 or f.cutmix < 0 or f.head_init_scale <= 0:
        raise ValueError("finetune.label_smoothing must be in [0, 1), finetune.mixup and finetune.cutmix >= 0 "
                         "(0 disables) and finetune.head_init_scale > 0")
    if f.num_classes < 0 or f.eval_every < 0:
        raise ValueError(f"finetune.num_classes={f.num_classes} (0 = the class folders of data.root) and "
                         f"finetune.eval_every={f.eval_every} (0 = at the end only) must be >= 0")
    if f.auto_augment:
        from timm.data import create_transform

        try:  # timm parses the policy string when it builds the transform
            create_transform(32, is_training=True, auto_augment=f.auto_augment)
        except (AssertionError, ValueError, KeyError, IndexError):
            raise ValueError(f"finetune.auto_augment={f.auto_augment!r} is not a timm policy; use e.g. "
                             "rand-m9-mstd0.5-inc1-mmax9 (RandAugment), augmix-m5-w4-d2 or v0, or '' for none") from None
        _check_posterize(f.auto_augment)
    if not 0 <= f.ema_decay < 1:
        raise ValueError(f"finetune.ema_decay={f.ema_decay} must be in [0, 1), e.g. 0.9999; 0 disables the EMA")
    if (f.mixup > 0 or f.cutmix > 0) and cfg.train.micro_batch % 2:
        raise ValueError(f"train.micro_batch={cfg.train.micro_batch} must be even with mixup/cutmix (timm mixes "
                         "each batch with its reverse)")
    if f.ema_decay > 0:
        from beit_scale.engine.ds_config import load_ds_config  # JSON only

        stage = cfg.engine.zero_stage
        stage = load_ds_config(cfg.engine.ds_config).get("zero_optimization", {}).get("stage", 0) if stage is None else stage
        if stage == 3:
            raise ValueError("finetune.ema_decay needs engine.zero_stage <= 2: at ZeRO-3 each rank holds only a slice "
                             "of the weights, so an EMA would gather the whole model every step; set "
                             "finetune.ema_decay=0 or engine.zero_stage=2")
    classes = _class_folders(cfg.data.root, cfg.data.format)
    if f.num_classes and f.num_classes != len(classes):
        raise ValueError(f"finetune.num_classes={f.num_classes} but data.root={cfg.data.root!r} has {len(classes)} "
                         f"class folders; set finetune.num_classes={len(classes)} (or 0 to count them)")
    if cfg.data.val_root and _class_folders(cfg.data.val_root, cfg.data.format) != classes:
        raise ValueError(f"data.val_root={cfg.data.val_root!r} must hold the same class folders as data.root "
                         f"(labels are the sorted folder names); they differ")
    if f.init_from:
        from beit_scale.checkpoint.export import describe_source  # metadata only

        source = describe_source(f.init_from)
        if source.model and source.model != cfg.model.name:
            raise ValueError(f"finetune.init_from={f.init_from!r} was trained as {source.model} but "
                             f"model.name={cfg.model.name}; set model.name={source.model}")


def _check_probe(cfg: Config, grid: int, img: int) -> None:
    """A linear probe: the fine-tuning checks, a block to probe, and none of the augmentation it must not use."""
    _check_finetune(cfg)
    f = cfg.finetune
    depth = get_spec(cfg.model.name).depth
    if not 0 <= f.probe_block <= depth:
        raise ValueError(f"finetune.probe_block={f.probe_block} must be in [1, {depth}] blocks of {cfg.model.name} "
                         "(0 = the last)")
    used = [f"finetune.{n}={getattr(f, n)!r}" for n, off in (("mixup", 0.0), ("cutmix", 0.0), ("re_prob", 0.0),
                                                            ("auto_augment", ""), ("ema_decay", 0.0),
                                                            ("layer_decay", 1.0)) if getattr(f, n) != off]
    if used:
        raise ValueError(f"a linear probe trains one layer on frozen features without heavy augmentation: "
                         f"{', '.join(used)} must be left at 0 ('' for auto_augment, 1 for layer_decay)")


def _check_segment(cfg: Config, grid: int = 0, img: int = 0) -> None:
    """Semantic segmentation: a crop the pyramid can halve, classes beside the ignore label, data.root in the ADE20K
    layout with labels that fit num_classes, ZeRO 0-2, and the weights to start from."""
    from beit_scale.data.segmentation import IGNORE_INDEX

    s, spec = cfg.segment, get_spec(cfg.model.name)
    step = 2 * spec.patch_size  # the 1/32 level (max pool) halves the patch grid
    if s.crop_px < step or s.crop_px % step:
        raise ValueError(f"segment.crop_px={s.crop_px} must be a multiple of {step} px, twice the patch size "
                         f"{spec.patch_size} of {cfg.model.name} (the pyramid halves the patch grid), e.g. "
                         f"{max(step, s.crop_px - s.crop_px % step)}")
    if cfg.model.img_size is not None and cfg.model.img_size != s.crop_px:
        raise ValueError(f"model.img_size={cfg.model.img_size} but segment.crop_px={s.crop_px}: the segmenter's input "
                         "is the crop; leave model.img_size unset (null) and set segment.crop_px")
    most = IGNORE_INDEX - 1 if s.reduce_zero_label else IGNORE_INDEX
    shift = " and reduce_zero_label shifts class c to c-1" if s.reduce_zero_label else ""
    if not 1 <= s.num_classes <= most:
        raise ValueError(f"segment.num_classes={s.num_classes} must be in [1, {most}]: label {IGNORE_INDEX} marks "
                         f"ignored pixels{shift}; "
                         "ADE20K has 150 (with segment.reduce_zero_label=true)")
    if s.class_names and len(s.class_names) != s.num_classes:
        raise ValueError(f"segment.class_names has {len(s.class_names)} names but segment.num_classes={s.num_classes}; "
                         "give one name per class, or [] to use the class indices")
    lo, hi = s.ratio_range
    if not lo <= hi:
        raise ValueError(f"segment.ratio_range={list(s.ratio_range)} must be [min, max] with min <= max, "
                         "e.g. [0.5, 2.0]")
    if s.eval_stride > s.crop_px:
        raise ValueError(f"segment.eval_stride={s.eval_stride} must be <= segment.crop_px={s.crop_px} (windows without "
                         f"gaps); the reference uses 2/3 of the crop, e.g. {s.crop_px * 2 // 3}")
    if _zero_stage(cfg) == 3:
        raise ValueError("the segment job needs engine.zero_stage <= 2: sliding-window evaluation runs a different "
                         "number of windows on each rank, which ZeRO-3's collective forwards cannot; set "
                         "engine.zero_stage=2")
    if cfg.data.format != "folder" or cfg.data.val_root:
        raise ValueError("the segment job reads both splits from data.root in the ADE20K layout: set "
                         "data.format=folder and data.val_root='' (the validation split is "
                         "data.root/images/validation)")
    _check_segment_labels(cfg.data.root, s.num_classes, s.reduce_zero_label)
    if s.init_from:
        from beit_scale.checkpoint.export import describe_source  # metadata only

        source = describe_source(s.init_from, "segment.init_from")
        if source.model and source.model != cfg.model.name:
            raise ValueError(f"segment.init_from={s.init_from!r} was trained as {source.model} but "
                             f"model.name={cfg.model.name}; set model.name={source.model}")


def _zero_stage(cfg: Config) -> int:
    from beit_scale.engine.ds_config import load_ds_config  # JSON only

    stage = cfg.engine.zero_stage
    return load_ds_config(cfg.engine.ds_config).get("zero_optimization", {}).get("stage", 0) if stage is None else stage


def _check_segment_labels(root: str, num_classes: int, reduce: bool) -> None:
    """Both splits are there, and the first training annotation's classes fit ``num_classes`` (the labels after
    ADE20K's shift when ``reduce``), so a wrong setting fails here and not in the loss hours later."""
    from beit_scale.data.segmentation import IGNORE_INDEX, load_label, reduce_zero_label

    for split in ("training", "validation"):
        for kind in ("images", "annotations"):
            if not (Path(root) / kind / split).is_dir():
                raise ValueError(f"data.root={root!r} has no {kind}/{split} folder; the segment job reads the ADE20K "
                                 "layout ROOT/images/{training,validation}/<stem>.jpg and "
                                 "ROOT/annotations/{training,validation}/<stem>.png")
    first = min((p for p in (Path(root) / "annotations" / "training").iterdir() if p.suffix == ".png"), default=None)
    if first is None:
        raise ValueError(f"data.root={root!r}: annotations/training holds no .png annotation")
    label = load_label(str(first))
    label = reduce_zero_label(label) if reduce else label
    bad = sorted(set(label.ravel().tolist()) - {IGNORE_INDEX} - set(range(num_classes)))
    if bad:
        raise ValueError(f"annotation {first} holds classes {bad[:5]} (after segment.reduce_zero_label="
                         f"{str(reduce).lower()}) outside [0, segment.num_classes={num_classes}) and the ignore label "
                         f"{IGNORE_INDEX}; set "
                         "segment.num_classes to the dataset's classes, and segment.reduce_zero_label=true for ADE20K "
                         "(annotation 0 = ignored) or false where 0 is a class")


_BY_KIND = {"mim": _check_pretrain, "tokenizer": _check_tokenizer_arch, "finetune": _check_finetune,
            "probe": _check_probe, "segment": _check_segment}
