"""Config: recipes load, overrides apply, and every validation error names the field and the fix."""
import dataclasses
import re

import pytest

from beit_scale.checks import validate
from beit_scale.config import Config, dump_yaml, list_recipes, load_config


@pytest.fixture
def data_root(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    return tmp_path / "train"


def _pretrain(data_root, tokenizer_file, *overrides):
    return load_config("pretrain_base_in1k", [f"data.root={data_root}", f"tokenizer.path={tokenizer_file}",
                                              "train.micro_batch=8", "train.global_batch=16", *overrides])


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)


def test_base_recipe_inheritance_and_overrides():
    cfg = load_config("pretrain_giant_in22k", ["optim.lr=2e-3", "optim.betas=[0.9, 0.98]", "model.img_size=448"])
    assert cfg.model.name == "beit_giant_patch14_224"  # own
    assert cfg.masking.num_masked == 102  # own
    assert cfg.engine.ds_config == "ds_configs/giant.json"
    assert cfg.train.total_steps == 150000  # from pretrain_large_in22k
    assert cfg.optim.weight_decay == 0.05  # from pretrain_base_in1k
    assert cfg.optim.lr == 2e-3 and cfg.optim.betas == (0.9, 0.98) and cfg.model.img_size == 448


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("pretrain_large_in22k", ["train.log_every=7"])
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize("override, message", [
    ("model.nme=x", r"unknown config key model\.nme; did you mean model\.name\?"),
    ("modle.name=x", r"unknown config key modle; did you mean model\?"),
    ("train.total_steps=1.5", r"train\.total_steps=1\.5 must be an integer"),
    ("train.total_steps=true", r"train\.total_steps=True must be an integer"),
    ("optim.lr=fast", r"optim\.lr='fast' must be a number"),
    ("optim.betas=[0.9]", r"optim\.betas=\[0\.9\] must be a list of 2 numbers"),
    ("masking.kind=grid", r"masking\.kind='grid' must be one of 'blockwise', 'random'"),
    ("model.grad_checkpointing=1", r"model\.grad_checkpointing=1 must be true or false"),
    ("train", r"override 'train' must look like section\.field=value"),
])
def test_bad_keys_and_types_fail_with_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("pretrain_base_in1k", [override])


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"recipe 'nope' is neither a YAML file nor a shipped recipe; shipped: .*pretrain_base_in1k"):
        load_config("nope")


def test_valid_pretrain_config_passes(data_root, tiny_tokenizer_file):
    validate(_pretrain(data_root, tiny_tokenizer_file(112, 8)), world_size=2)


@pytest.mark.parametrize("overrides, world, message", [
    ((), 4, r"train\.global_batch=16 must equal train\.micro_batch \(8\) x train\.grad_accum \(1\) x ranks \(4\) = 32; "
            r"set train\.global_batch=32"),
    (("model.img_size=200",), 2, r"model\.img_size=200 is not divisible by the patch size 16 of beit_base_patch16_224"),
    (("masking.num_masked=196",), 2, r"masking\.num_masked=196 must be >= 1 and < 196 patches \(14x14 grid\)"),
    (("masking.num_masked=200",), 2, r"masking\.num_masked=200 must be >= 1 and < 196 patches"),
    (("masking.min_block_patches=80",), 2, r"masking\.min_block_patches=80 must be in \[1, masking\.num_masked=75\]"),
    (("optim.warmup_steps=600000",), 2, r"optim\.warmup_steps=600000 must be in \[0, train\.total_steps=500000\)"),
    (("optim.min_lr=1.0",), 2, r"optim\.min_lr=1\.0 must be in \[0, optim\.lr=0\.0015\]"),
    (("model.name=beit_huge",), 2, r"model\.name='beit_huge' is not in the zoo; choose one of .*beit_base_patch16_224"),
    (("engine.ds_config=ds_configs/none.json",), 2, r"engine\.ds_config='ds_configs/none\.json': no such file"),
    (("engine.zero_stage=4",), 2, r"engine\.zero_stage=4 must be 0, 1, 2 or 3"),
    (("data.crop_scale=[0.5, 0.2]",), 2, r"data\.crop_scale=\[0\.5, 0\.2\] must satisfy 0 < min <= max <= 1"),
])
def test_impossible_combinations_fail_before_any_process_group(data_root, tiny_tokenizer_file, overrides, world, message):
    cfg = _pretrain(data_root, tiny_tokenizer_file(112, 8), *overrides)
    with pytest.raises(ValueError, match=message):
        validate(cfg, world_size=world)


def test_missing_data_root_and_tokenizer_are_named(tmp_path, data_root):
    with pytest.raises(ValueError, match=r"data\.root='.*nowhere' is not a folder; expected the ImageNet layout"):
        validate(_pretrain(tmp_path / "nowhere", "x"), world_size=2)
    with pytest.raises(ValueError, match=r"tokenizer\.path='.*missing\.safetensors': no such file; train one"):
        validate(_pretrain(data_root, tmp_path / "missing.safetensors"), world_size=2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"is not a safetensors tokenizer file"):
        validate(_pretrain(data_root, bad), world_size=2)


def test_tokenizer_grid_must_match_the_patch_grid_never_cropped(data_root, tiny_tokenizer_file):
    # Giant: patch 14 -> 16x16 patches at 224 px, but a 112 px view with an 8x dVAE gives 14x14 tokens.
    cfg = _pretrain(data_root, tiny_tokenizer_file(112, 8), "model.name=beit_giant_patch14_224",
                    "masking.num_masked=102")
    with pytest.raises(ValueError, match=r"set tokenizer\.input_size=128"):
        validate(cfg, world_size=2)
    ok = _pretrain(data_root, tiny_tokenizer_file(128, 8), "model.name=beit_giant_patch14_224", "masking.num_masked=102")
    validate(ok, world_size=2)


def test_tokenizer_job_checks_its_own_grid(data_root):
    cfg = load_config("tokenizer_dvae_giant_in1k", [f"data.root={data_root}", "train.micro_batch=8",
                                                    "train.global_batch=8", "tokenizer.input_size=112"])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, job="tokenizer"))
    with pytest.raises(ValueError, match=r"set tokenizer\.input_size=128"):
        validate(cfg, world_size=1)


def test_ds_config_clash_with_the_recipe_is_an_error(tmp_path, data_root, tiny_tokenizer_file):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "train_batch_size": 8}')
    cfg = _pretrain(data_root, tiny_tokenizer_file(112, 8), f"engine.ds_config={ds}")
    with pytest.raises(ValueError, match=r"sets keys the recipe owns: gradient_clipping \(set optim\.clip_grad in the recipe\), "
                                         r"train_batch_size \(set train\.global_batch in the recipe\)"):
        validate(cfg, world_size=2)


# ------------------------------------------------------------------ every value checked (NaN, inf, ranges)


def _numeric_fields(cls, prefix=""):
    """(dotted name, type, tuple length or 0) of every int and float field of the tree, tuples and optionals too."""
    import types
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[int] -> int
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is tuple and typing.get_args(tp)[-1] is not Ellipsis:  # tuple[float, float]
            if typing.get_args(tp)[0] in (int, float):
                yield f"{prefix}{f.name}", typing.get_args(tp)[0], len(typing.get_args(tp))
        elif tp in (int, float):
            yield f"{prefix}{f.name}", tp, 0


@pytest.mark.parametrize("name, tp, length", list(_numeric_fields(Config)))
def test_every_number_is_finite_and_every_integer_non_negative_by_default(name, tp, length):
    """A field added tomorrow gets these checks without anyone writing one (range checks are false for NaN)."""
    bad = ".nan" if tp is float else "-1"
    value = f"[{', '.join([bad] * length)}]" if length else bad
    with pytest.raises(ValueError, match=re.escape(name) + r".*(must be a finite number|must be >= 0)"):
        load_config("pretrain_base_in1k", [f"{name}={value}"])
    if tp is float:
        with pytest.raises(ValueError, match="must be a finite number"):
            load_config("pretrain_base_in1k", [f"{name}={value.replace('.nan', '.inf')}"])


@pytest.mark.parametrize("override, message", [
    ("optim.weight_decay=.nan", r"optim\.weight_decay=nan must be a finite number"),
    ("optim.clip_grad=.nan", r"optim\.clip_grad=nan must be a finite number"),
    ("train.heartbeat_timeout=.nan", r"train\.heartbeat_timeout=nan must be a finite number"),
    ("optim.lr=.inf", r"optim\.lr=inf must be a finite number"),
    ("optim.lr=nan", r"optim\.lr=nan must be a finite number"),  # a string YAML does not read as a number
    ("run.seed=-1", r"run\.seed=-1 must be >= 0"),
])
def test_non_finite_and_negative_values_are_refused_when_read(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("pretrain_base_in1k", [override])


@pytest.mark.parametrize("override, message", [
    ("optim.eps=0", r"optim\.eps=0\.0 must be in \(0, inf\)"),
    ("optim.lr=0", r"optim\.lr=0\.0 must be in \(0, inf\)"),
    ("model.drop_path=5", r"model\.drop_path=5\.0 must be in \[0, 1\)"),
    ("data.std=[0,0,0]", r"data\.std=\[0\.0, 0\.0, 0\.0\] must be in \(0, inf\)"),
    ("data.std=[0.2,0,0.2]", r"data\.std=\[0\.2, 0\.0, 0\.2\] must be in \(0, inf\)"),
    ("train.max_consecutive_skips=0", r"train\.max_consecutive_skips=0 must be in \[1, inf\)"),
    ("optim.betas=[0.9,1.0]", r"optim\.betas=\[0\.9, 1\.0\] must be in \[0, 1\)"),
    ("tokenizer.anneal_fraction=0", r"tokenizer\.anneal_fraction=0\.0 must be in \(0, 1\]"),
    ("run.output_dir=", r"run\.output_dir is empty; name the run's folder"),
    ("run.output_dir=' '", r"run\.output_dir is empty"),
    ("train.preempt_signal=CHLD", r"train\.preempt_signal='CHLD' is not a signal a scheduler sends before preempting"),
    ("train.preempt_signal=SIGKILL", r"is not a signal a scheduler sends"),
    ("checkpoint.allow_changes=[train.totl_steps]", r"names 'train\.totl_steps', which is not a config field; did you "
                                                    r"mean train\.total_steps\?"),
])
def test_out_of_range_values_fail_validation_naming_the_interval(data_root, tiny_tokenizer_file, override, message):
    cfg = _pretrain(data_root, tiny_tokenizer_file(112, 8), override)
    with pytest.raises(ValueError, match=message):
        validate(cfg, world_size=2)


def test_every_range_names_a_real_field_and_shipped_recipes_are_inside_them():
    from beit_scale.checks import RANGES, _check_ranges

    for name in RANGES:
        section, field = name.split(".")
        assert field in {f.name for f in dataclasses.fields(getattr(Config(), section))}, name
    for recipe in list_recipes():
        _check_ranges(load_config(recipe))


def test_preemption_signals_a_scheduler_sends_are_accepted(data_root, tiny_tokenizer_file):
    for sig in ("USR1", "SIGUSR2", "TERM", ""):
        validate(_pretrain(data_root, tiny_tokenizer_file(112, 8), f"train.preempt_signal={sig}"), world_size=2)


# ------------------------------------------------------------------ malformed recipes: messages, not tracebacks


def test_malformed_yaml_recipe_is_named_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  total_steps: [1, 2\nmodel:\n  name: x\n")
    with pytest.raises(ValueError, match=r"recipe .*bad\.yaml is not valid YAML: .*line"):
        load_config(str(bad))


@pytest.mark.parametrize("base", ["[pretrain_base_in1k, quickstart_pretrain]", "{a: 1}", "''", "3"])
def test_base_must_name_one_recipe(tmp_path, base):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {base}\ntrain:\n  total_steps: 5\n")
    with pytest.raises(ValueError, match=r"base=.* must name one recipe"):
        load_config(str(recipe))


def test_an_override_that_is_not_yaml_says_how_to_write_it():
    with pytest.raises(ValueError, match=r"override 'optim\.betas=\[0\.9, 0\.99': the value is not valid YAML"):
        load_config("pretrain_base_in1k", ["optim.betas=[0.9, 0.99"])


def test_a_binary_recipe_file_is_a_message(tmp_path):
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"recipe .*bin\.yaml (cannot be read|is not valid YAML)"):
        load_config(str(bad))


# ------------------------------------------------------------------ tokenizer files that were not written by us


def _tokenizer_variant(path, arch_edit=None, drop_tensor=None, meta_arch=None):
    import json

    from safetensors.torch import load_file

    from beit_scale.checkpoint.weights import save_weights

    weights = load_file(str(path))
    if drop_tensor:
        weights.pop(drop_tensor)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    arch = json.loads(meta["arch"])
    if arch_edit:
        arch_edit(arch)
    meta["arch"] = meta_arch if meta_arch is not None else json.dumps(arch)
    out = path.with_name("variant.safetensors")
    save_weights(weights, out, meta)
    return out


@pytest.mark.parametrize("edit, meta_arch", [
    (lambda a: a.pop("hidden_dim"), None),  # a key missing
    (lambda a: a.update(dropout=0.1), None),  # a key we do not know
    (None, "not json"),
])
def test_tokenizer_file_with_other_architecture_keys_is_refused(data_root, tiny_tokenizer_file, edit, meta_arch):
    bad = _tokenizer_variant(tiny_tokenizer_file(112, 8), arch_edit=edit, meta_arch=meta_arch)
    with pytest.raises(ValueError, match=r"its metadata 'arch' must hold exactly \['codebook_dim', 'downsample'"):
        validate(_pretrain(data_root, bad), world_size=2)


def test_tokenizer_weights_that_do_not_match_the_architecture_are_refused(tiny_tokenizer_file):
    from safetensors.torch import load_file

    from beit_scale.checkpoint.tokenizer_file import load_tokenizer

    path = tiny_tokenizer_file(112, 8)
    missing = _tokenizer_variant(path, drop_tensor=sorted(load_file(str(path)))[0])
    with pytest.raises(ValueError, match=r"the weights do not match the architecture in its metadata \(Missing key"):
        load_tokenizer(missing)
    wider = _tokenizer_variant(path, arch_edit=lambda a: a.update(codebook_dim=16))  # same tensors, other shapes
    with pytest.raises(ValueError, match=r"the weights do not match the architecture in its metadata \(size mismatch"):
        load_tokenizer(wider)


def test_fp16_gets_dynamic_loss_scaling_and_fp16_buffers_and_never_runs_beside_bf16(tmp_path):
    from beit_scale.engine.ds_config import build_ds_config, load_ds_config

    cfg = load_config("quickstart_pretrain", ["engine.precision=fp16"])
    ds = build_ds_config(cfg, 1)
    assert ds["fp16"] == {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                          "min_loss_scale": 1, "enabled": True}
    assert ds["bf16"]["enabled"] is False and ds["data_types"]["buffer_dtype"] == "fp16"
    (tmp_path / "own.json").write_text('{"fp16": {"enabled": true, "initial_scale_power": 8}}')
    own = build_ds_config(load_config("quickstart_pretrain", [f"engine.ds_config={tmp_path / 'own.json'}"]), 1)
    assert own["fp16"]["initial_scale_power"] == 8 and own["fp16"]["loss_scale"] == 0  # the file's settings win
    (tmp_path / "both.json").write_text('{"fp16": {"enabled": true}, "bf16": {"enabled": true}}')
    with pytest.raises(ValueError, match=r"enables both fp16 and bf16; keep one"):
        load_ds_config(str(tmp_path / "both.json"))
