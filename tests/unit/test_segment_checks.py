"""The segment job's recipe checks fail before any process group starts, naming the field and the fix; the poly
schedule is mmseg's; a pipeline stage submits a segment recipe with launch/segment.sbatch."""
import pytest
import torch
import yaml

from beit_scale.checks import validate
from beit_scale.config import PROJECT_ROOT, OptimConfig, load_config
from beit_scale.data.fmnist_scenes import export_fmnist_scenes
from beit_scale.engine.core import StepSchedule
from beit_scale.pipeline import load_chain, submit


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return export_fmnist_scenes(tmp_path_factory.mktemp("scenes") / "s", num_train=2, num_val=1)


def quickstart(scenes, *overrides):
    return load_config("segment_quickstart", [f"data.root={scenes}", *overrides])


def test_the_quickstart_recipe_validates_on_exported_scenes(scenes):
    validate(quickstart(scenes), world_size=1)


@pytest.mark.parametrize("overrides, message", [
    (["segment.crop_px=60"], r"segment\.crop_px=60 must be a multiple of 8 px, twice the patch size 4 .* e\.g\. 56"),
    (["segment.num_classes=0"], r"segment\.num_classes=0 must be in \[1, 255\]: label 255 marks ignored pixels"),
    (["segment.num_classes=255", "segment.reduce_zero_label=true", "segment.class_names=[]"],
     r"segment\.num_classes=255 must be in \[1, 254\].*reduce_zero_label shifts"),
    (["segment.num_classes=5", "segment.class_names=[]"],
     r"annotation .*scene_000000\.png holds classes .* outside \[0, segment\.num_classes=5\)"),
    (["segment.class_names=[a, b]"], r"segment\.class_names has 2 names but segment\.num_classes=11"),
    (["model.img_size=64"], r"model\.img_size=64 but segment\.crop_px=32: .*leave model\.img_size unset"),
    (["engine.zero_stage=3"], r"needs engine\.zero_stage <= 2: sliding-window evaluation"),
    (["data.val_root=/tmp"], r"reads both splits from data\.root .* data\.val_root=''"),
    (["segment.eval_stride=33"], r"segment\.eval_stride=33 must be <= segment\.crop_px=32"),
    (["segment.ratio_range=[2.0, 0.5]"], r"segment\.ratio_range=\[2\.0, 0\.5\] must be \[min, max\]"),
    (["segment.cat_max_ratio=0"], r"segment\.cat_max_ratio=0\.0 must be in \(0, 1\]"),
    (["segment.layer_decay=1.5"], r"segment\.layer_decay=1\.5 must be in \(0, 1\]"),
    (["optim.schedule=step"], r"optim\.schedule='step' must be one of 'cosine', 'poly'"),
    (["segment.init_from=/no/such/weights"], r"segment\.init_from='/no/such/weights': no such file or folder"),
])
def test_a_bad_segment_recipe_names_the_field_and_the_fix(scenes, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(quickstart(scenes, *overrides), world_size=1)


def test_a_root_without_the_validation_split_is_refused(scenes, tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"has no images/validation folder; the segment job reads the ADE20K layout"):
        validate(quickstart(tmp_path), world_size=1)


def test_poly_schedule_warms_up_then_decays_linearly_from_step_zero_as_mmseg():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    schedule = StepSchedule(optimizer, OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=2, schedule="poly"), 10)
    lrs = []
    for step in range(10):
        schedule.apply(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.0, 0.5, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], abs=1e-12)


def test_a_chain_stage_runs_a_segment_recipe_through_its_sbatch_script(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"name": "seg", "stages": [
        {"name": "ft", "job": "finetune", "config": "finetune_base_pt22k_ft22k"},
        {"name": "ade", "job": "segment", "config": "segment_base_ade20k_640", "overrides": ["segment.init_from={ft}"]},
    ]}))
    chain = load_chain(str(path))
    assert "segment.init_from=runs/finetune_base_pt22k_ft22k" in chain.stages[1].overrides
    command = submit(chain, dry_run=True)[1]["command"]
    assert command[-4:-1] == [str(PROJECT_ROOT / "launch" / "segment.sbatch"), "--config", "segment_base_ade20k_640"]
