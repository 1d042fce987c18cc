"""Fine-tuning config, recipes, data helpers and the timm export, without any process group."""
import pytest
import torch

from beit_scale.checks import validate
from beit_scale.checkpoint.export import check_loads_in_timm, describe_source, timm_state_dict
from beit_scale.config import list_recipes, load_config
from beit_scale.models import ZOO, BeitMIM, build_classifier
from beit_scale.data import class_balanced_subset, eval_shard

FINETUNE_RECIPES = [r for r in list_recipes() if r.startswith(("finetune_", "linprobe_"))]
SIZES = ("base", "large", "giant")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:timm.layers.interpolate")


@pytest.fixture
def folders(tmp_path):
    """ImageFolder roots with 2 classes (no images needed by the checks)."""
    roots = {}
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
        roots[split] = tmp_path / split
    return roots


def job_config(recipe, folders, *overrides, world=None):
    """The recipe with local data (ImageFolders, also where the recipe reads shards) and no init_from, validated for
    the world size its batch comments give."""
    cfg = load_config(recipe, [f"data.root={folders['train']}", f"data.val_root={folders['val']}", "data.format=folder",
                               "finetune.init_from=", "finetune.num_classes=0", *overrides])
    t = cfg.train
    return cfg, world or t.global_batch // (t.micro_batch * t.grad_accum)


@pytest.mark.parametrize("recipe", FINETUNE_RECIPES)
def test_every_finetune_recipe_validates_for_its_stated_batch(recipe, folders):
    cfg, world = job_config(recipe, folders)
    assert cfg.run.job in ("finetune", "linprobe")
    assert cfg.train.global_batch == cfg.train.micro_batch * cfg.train.grad_accum * world
    validate(cfg, world)


@pytest.mark.parametrize("size", SIZES)
def test_the_chain_recipes_point_at_each_other_with_the_papers_numbers(size):
    ft22k = load_config(f"finetune_{size}_pt22k_ft22k")
    ft1k = load_config(f"finetune_{size}_pt22k_ft22k_ft1k")
    assert (ft22k.run.name, ft1k.run.name) == ("pt22k_ft22k", "pt22k_ft22k_ft1k")
    assert (ft22k.data.format, ft1k.data.format) == ("shards", "folder")  # 22k as tar shards, 1k as its folders
    assert ft1k.finetune.init_from == ft22k.run.output_dir  # the chain, without editing files
    assert (ft22k.finetune.num_classes, ft1k.finetune.num_classes) == (21841, 1000)
    assert ft22k.model.name == ft1k.model.name and ft22k.model.name.startswith(f"beit_{size}_")
    assert {"base": 0.65, "large": 0.75}.get(size, ft22k.finetune.layer_decay) == ft22k.finetune.layer_decay
    assert {"base": 0.85, "large": 0.9}.get(size, ft1k.finetune.layer_decay) == ft1k.finetune.layer_decay
    assert ft22k.finetune.layer_decay < ft1k.finetune.layer_decay
    for cfg in (ft22k, ft1k):
        f = cfg.finetune
        assert 0.1 <= cfg.model.drop_path <= 0.4 and 0 < cfg.optim.warmup_steps < cfg.train.total_steps
        assert (f.auto_augment, f.re_prob, f.label_smoothing) == ("rand-m9-mstd0.5-inc1-mmax9", 0.25, 0.1)
    assert (ft22k.finetune.mixup, ft22k.finetune.cutmix, ft22k.train.global_batch) == (0.8, 1.0, 2048)
    assert (ft1k.optim.lr, ft1k.optim.weight_decay, ft1k.train.global_batch) == (2e-5, 1e-8, 512)
    # epochs -> steps: 90 epochs of ImageNet-22k at 2048, 30 of ImageNet-1k at 512 (drop_last)
    assert ft22k.train.total_steps == 90 * (14_197_122 // 2048) and ft22k.optim.warmup_steps == 5 * 6932
    assert ft1k.train.total_steps == 30 * (1_281_167 // 512) and ft1k.optim.warmup_steps == 5 * 2502
    assert pretrain_output(size) == ft22k.finetune.init_from


def pretrain_output(size: str) -> str:
    """Where the pt22k run of each size writes (base has no 22k pretraining recipe: its comment gives the command)."""
    return {"base": "runs/pretrain_base_in22k"}.get(size) or load_config(f"pretrain_{size}_in22k").run.output_dir


def test_the_384_variant_resizes_and_evaluates_without_cropping(folders):
    cfg, world = job_config("finetune_base_pt22k_ft22k_ft1k_384", folders)
    assert (cfg.model.img_size, cfg.finetune.crop_pct, cfg.run.name) == (384, 1.0, "pt22k_ft22k_ft1k")
    validate(cfg, world)


def tiny(folders, *overrides, job="finetune"):
    """The quickstart recipe of ``job`` on 2 ranks, with local folders."""
    return load_config(f"{job}_quickstart", [f"data.root={folders['train']}", f"data.val_root={folders['val']}",
                                             "finetune.init_from=", "finetune.num_classes=2", "train.micro_batch=8",
                                             "train.global_batch=16", *overrides])


@pytest.mark.parametrize("overrides, job, message", [
    (("finetune.layer_decay=1.5",), "finetune", r"finetune\.layer_decay=1\.5 must be in \(0, 1\]"),
    (("finetune.train_fraction=0",), "finetune", r"finetune\.train_fraction=0\.0 must be in \(0, 1\]"),
    (("finetune.re_prob=2",), "finetune", r"finetune\.re_prob=2\.0 is a probability"),
    (("finetune.mixup=0.8", "train.micro_batch=3", "train.global_batch=6"), "finetune",
     r"train\.micro_batch=3 must be even with mixup/cutmix"),
    (("finetune.ema_decay=0.999", "engine.zero_stage=3"), "finetune", r"finetune\.ema_decay needs engine\.zero_stage <= 2"),
    (("finetune.auto_augment=randaug9",), "finetune", r"finetune\.auto_augment='randaug9' is not a timm policy"),
    (("finetune.auto_augment=rand-m9-mstd0.5-inc1",), "finetune",
     r"finetune\.auto_augment='rand-m9-mstd0\.5-inc1' can draw magnitude 10, where timm's increasing posterize asks "
     r"Pillow for 0 bits and the data loader crashes; add -mmax9, e\.g\. rand-m9-mstd0\.5-inc1-mmax9"),
    (("finetune.auto_augment=rand-m10-inc1",), "finetune", r"'rand-m10-inc1' can draw magnitude 10"),
    (("finetune.auto_augment=rand-m9-mstd0.5", "finetune.mixup=0.8"), "linprobe",
     r"finetune\.mixup=0\.8, finetune\.auto_augment='rand-m9-mstd0\.5' must be left at 0"),
    (("finetune.layer_decay=0.65",), "linprobe", r"finetune\.layer_decay=0\.65 must be left at 0"),
    (("finetune.probe_block=5",), "linprobe", r"finetune\.probe_block=5 must be in \[1, 4\] blocks"),
    (("finetune.num_classes=10",), "finetune", r"finetune\.num_classes=10 but data\.root=.* has 2 class folders; "
                                               r"set finetune\.num_classes=2"),
    (("finetune.init_from=/nonexistent/run",), "finetune", r"finetune\.init_from='/nonexistent/run': no such file"),
])
def test_finetune_mistakes_fail_with_the_field_and_the_fix(folders, overrides, job, message):
    with pytest.raises(ValueError, match=message):
        validate(tiny(folders, *overrides, job=job), 2)


def test_ema_at_zero_2_and_a_plain_linprobe_pass(folders):
    validate(tiny(folders, "finetune.ema_decay=0.999", "engine.zero_stage=2"), 2)
    validate(tiny(folders, "finetune.probe_block=4", job="linprobe"), 2)


def test_val_classes_must_be_the_training_classes(folders):
    (folders["val"] / "c").mkdir()
    with pytest.raises(ValueError, match=r"data\.val_root=.* must hold the same class folders as data\.root"):
        validate(tiny(folders), 2)


def test_init_from_reads_only_safetensors_and_checks_the_model(folders, tmp_path):
    pickle = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    with pytest.raises(ValueError, match=r"only \.safetensors weights are read \(never pickles\)"):
        validate(tiny(folders, f"finetune.init_from={pickle}"), 2)
    with pytest.raises(ValueError, match="holds neither model.safetensors nor a complete checkpoint"):
        validate(tiny(folders, f"finetune.init_from={folders['train']}"), 2)
    from beit_scale.checkpoint.weights import save_weights

    model = BeitMIM(ZOO["beit_tiny_patch4_32"], vocab_size=16)
    save_weights(model.state_dict(), tmp_path / "mim.safetensors", {"format": "beit_scale.mim.v1",
                                                                    "model": "beit_tiny_patch4_32"})
    source = describe_source(tmp_path / "mim.safetensors")
    assert (source.kind, source.model, source.lineage) == ("weights", "beit_tiny_patch4_32", None)
    validate(tiny(folders, f"finetune.init_from={tmp_path / 'mim.safetensors'}"), 2)
    with pytest.raises(ValueError, match=r"was trained as beit_tiny_patch4_32 but model\.name=beit_tiny_patch16_224"):
        validate(tiny(folders, f"finetune.init_from={tmp_path / 'mim.safetensors'}", "model.name=beit_tiny_patch16_224",
                      "model.img_size=32"), 2)


# ------------------------------------------------------------------------------------------------------- data


def test_class_balanced_subset_takes_the_fraction_of_every_class_deterministically():
    targets = [0] * 50 + [1] * 30 + [2] * 3
    chosen = class_balanced_subset(targets, 0.1, seed=0)
    assert [sum(targets[i] == c for i in chosen) for c in range(3)] == [5, 3, 1]  # round, at least one
    assert chosen == sorted(chosen) == class_balanced_subset(targets, 0.1, seed=0)
    assert chosen != class_balanced_subset(targets, 0.1, seed=1)
    assert class_balanced_subset(targets, 1.0, seed=0) == list(range(len(targets)))


@pytest.mark.parametrize("n, world", [(64, 2), (65, 2), (7, 4), (3, 8)])
def test_eval_shards_have_equal_lengths_and_count_every_image_once(n, world):
    shards = [eval_shard(n, rank, world) for rank in range(world)]
    assert len({len(indices) for indices, _ in shards}) == 1  # same number of batches on every rank (ZeRO-3)
    counted = sorted(i for indices, valid in shards for i, v in zip(indices, valid) if v)
    assert counted == list(range(n))


# ----------------------------------------------------------------------------------------------------- export


def test_base_pretraining_state_dict_exports_to_timms_headless_model_strictly():
    with torch.device("meta"):
        mim = BeitMIM(ZOO["beit_base_patch16_224"], vocab_size=8192)
    sd, num_classes, img_size = timm_state_dict(mim.state_dict(), "beit_base_patch16_224")
    assert (num_classes, img_size) == (0, 224) and "lm_head.weight" not in sd and "mask_token" not in sd
    check_loads_in_timm(sd, "beit_base_patch16_224", num_classes, img_size)


@pytest.mark.parametrize("name, img_size, timm_name", [("beit_base_patch16_224", 224, "beit_base_patch16_224"),
                                                        ("beit_base_patch16_224", 384, "beit_base_patch16_384"),
                                                        ("beit_large_patch16_224", 224, "beit_large_patch16_224")])
def test_classifier_state_dicts_export_to_timm_strictly_at_their_resolution(name, img_size, timm_name):
    with torch.device("meta"):
        clf = build_classifier(ZOO[name], num_classes=1000, img_size=img_size)
    sd, num_classes, found = timm_state_dict(clf.state_dict(), name)
    assert (num_classes, found) == (1000, img_size)
    check_loads_in_timm(sd, timm_name, num_classes, img_size)
    with pytest.raises(ValueError, match=r"do not load strictly into timm's .* \(num_classes=10"):
        check_loads_in_timm(sd, timm_name, 10, img_size)


@pytest.mark.parametrize("shape", [(2,), (684,), (100, 3), (228,)])
def test_export_of_a_relative_position_table_of_the_wrong_shape_is_a_message(shape):
    mim = BeitMIM(ZOO["beit_tiny_patch4_32"], vocab_size=16)
    sd = mim.state_dict()
    sd["rel_pos_bias.relative_position_bias_table"] = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"relative position table has shape|a relative position table is"):
        timm_state_dict(sd, "beit_tiny_patch4_32")


def test_the_posterize_cap_is_needed_and_enough():
    """timm at magnitude 10 posterizes to 0 bits, which Pillow rejects; the mmax9 cap avoids it."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    hparams = {"img_mean": (124, 116, 104)}
    posterize = [op for op in rand_augment_transform("rand-m10-n1-inc1", hparams).ops if op.name == "PosterizeIncreasing"][0]
    posterize.prob = 1.0
    with pytest.raises(ValueError, match="bits must be between"):
        posterize(img)
    capped = [op for op in rand_augment_transform("rand-m10-n1-inc1-mmax9", hparams).ops if op.name == "PosterizeIncreasing"][0]
    capped.prob = 1.0
    capped(img)  # 9 of 10: 1 bit, accepted
