"""`beit-scale plan`: memory estimates agree with DeepSpeed's estimators and with a measured H100 peak."""
import json
from pathlib import Path

import pytest

from beit_scale.engine.ds_config import load_ds_config
from beit_scale.config import load_config
from beit_scale.engine.plan import (CONTEXT_BYTES, GIB, SHIPPED, activation_bytes, block_params, bucket_elements,
                                    ds_config_for, model_counts, model_states_bytes, plan, shipped_ds_config,
                                    write_plan)

ROOT = Path(__file__).resolve().parents[2]
SIZES = ["beit_base_patch16_224", "beit_large_patch16_224", "beit_giant_patch14_224"]


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_match_deepspeeds_estimators(name, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = model_counts(name)
    for offload in (False, True):
        _, ds2 = estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=offload)
        assert model_states_bytes(total, largest, 2, gpus, offload) == pytest.approx(ds2, abs=1)
        _, ds3, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, 1, cpu_offload=offload,
                                                          cpu_offload_params=offload)
        assert model_states_bytes(total, largest, 3, gpus, offload) == pytest.approx(ds3, abs=1)
    # ZeRO-1 partitions only the fp32 states: between ZeRO-2 and unpartitioned.
    z1 = model_states_bytes(total, largest, 1, gpus, False)
    assert model_states_bytes(total, largest, 2, gpus, False) <= z1 <= 20 * total


def test_estimate_matches_the_peak_measured_on_an_h100():
    rows = json.loads((ROOT / "benchmarks/results/gpu_perf_h100.json").read_text())
    measured = next(r for r in rows if r.get("label") == "ds_configs/base.json")  # beit_base, ZeRO-1, 1 GPU
    total, largest = model_counts("beit_base_patch16_224")
    estimate = (model_states_bytes(total, largest, 1, 1, False)
                + activation_bytes("beit_base_patch16_224", measured["batch"], False)) / GIB
    assert estimate == pytest.approx(measured["peak_GiB"], rel=0.10)  # 9.83 vs 10.16 GiB when written


def test_recomputation_and_more_gpus_need_less_memory():
    assert activation_bytes("beit_large_patch16_224", 32, True) < 0.25 * activation_bytes("beit_large_patch16_224", 32, False)
    total, largest = model_counts("beit_giant_patch14_224")
    assert model_states_bytes(total, largest, 3, 64, False) < model_states_bytes(total, largest, 3, 8, False)


def test_plan_picks_the_fastest_fitting_setup_and_writes_its_ds_config(tmp_path):
    rows = plan("beit_base_patch16_224", 8, 80)
    assert (rows[0].zero_stage, rows[0].offload_optimizer, rows[0].grad_checkpointing) == (1, False, False)
    assert all(r.total_gib <= 80 for r in rows if r.fits)
    giant = plan("beit_giant_patch14_224", 1, 24)  # 19 GiB of states: fits only with recomputation
    assert (giant[0].zero_stage, giant[0].grad_checkpointing, giant[0].total_gib <= 24) == (1, True, True)
    giant_small = plan("beit_giant_patch14_224", 1, 16)  # 20 bytes/param of states do not fit one 16 GiB GPU
    best = giant_small[0]
    assert best.fits and best.offload_optimizer and best.total_gib <= 16
    assert not plan("beit_giant_patch14_224", 1, 1)[0].fits  # the CUDA context alone takes the 1 GiB
    write_plan(rows, tmp_path / "ds.json", "beit_base_patch16_224")
    assert json.loads((tmp_path / "ds.json").read_text()) == ds_config_for(rows[0], "beit_base_patch16_224")
    assert load_ds_config(str(tmp_path / "ds.json"))["zero_optimization"]["stage"] == 1  # no recipe-owned keys
    with pytest.raises(ValueError, match="no configuration fits"):
        write_plan(plan("beit_giant_patch14_224", 1, 1), tmp_path / "none.json", "beit_giant_patch14_224")


def test_buckets_and_zero3_limits_are_sized_in_blocks_and_grow_with_the_node_count():
    name = "beit_giant_patch14_224"
    block = block_params(name)
    d, h = 1408, 6144  # q/k/v + proj 4d^2, MLP 2dh; q and v biases, proj bias, 2 norms, fc biases, 2 layer scales
    assert block == 4 * d * d + 2 * d * h + 10 * d + h
    z3 = plan(name, 8, 80, stages=(3,))[0]
    zero = ds_config_for(z3, name, nodes=1)["zero_optimization"]
    assert zero["stage"] == 3 and zero["leaf_module"] == {"classes": ["timm.models.beit.Block"]}
    assert zero["stage3_prefetch_bucket_size"] == block and zero["stage3_max_live_parameters"] == 3 * block
    assert zero["reduce_bucket_size"] == block and "allgather_bucket_size" not in zero
    assert [bucket_elements(block, n) for n in (1, 2, 8, 9, 64)] == [block, 2 * block, 2 * block, 4 * block, 4 * block]
    assert {r.zero_stage for r in plan(name, 8, 80, stages=(3,))} == {3}
    with pytest.raises(ValueError, match="ZeRO stages 1, 2, 3"):
        plan(name, 8, 80, stages=(4,))


@pytest.mark.parametrize("file", sorted(SHIPPED))
def test_each_shipped_ds_config_is_the_plans_choice_for_its_cluster(file):
    assert json.loads((ROOT / "beit_scale/ds_configs" / file).read_text()) == shipped_ds_config(file)


@pytest.mark.parametrize("recipe", ["pretrain_base_in1k", "pretrain_large_in22k", "pretrain_giant_in22k",
                                    "finetune_large_pt22k_ft22k", "finetune_giant_pt22k_ft22k"])
def test_each_large_recipe_fits_an_80_gb_card_without_recomputation_at_zero_1(recipe):
    cfg = load_config(recipe, [])
    ds = json.loads((ROOT / "beit_scale" / cfg.engine.ds_config).read_text())
    name, gpus = cfg.model.name, cfg.train.global_batch // (cfg.train.micro_batch * cfg.train.grad_accum)
    assert ds["zero_optimization"]["stage"] == 1 and not cfg.model.grad_checkpointing
    total, largest = model_counts(name)
    need = model_states_bytes(total, largest, 1, gpus, False) + activation_bytes(name, cfg.train.micro_batch, False)
    assert need + CONTEXT_BYTES < 0.8 * 80 * GIB, (recipe, gpus, need / GIB)


def test_leaf_module_classes_absent_from_the_model_are_dropped_before_deepspeed_sees_them():
    from timm.models.beit import Block
    from torch import nn

    from beit_scale.engine.core import leaf_modules_for

    ds = load_ds_config("ds_configs/tiny.json")
    assert ds["zero_optimization"]["leaf_module"] == {"classes": ["timm.models.beit.Block"]}
    dvae_like = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    kept = leaf_modules_for(dvae_like, ds)
    assert "leaf_module" not in kept["zero_optimization"]
    assert kept["zero_optimization"]["stage"] == ds["zero_optimization"]["stage"]
    assert "leaf_module" in ds["zero_optimization"], "the caller's config is not modified"
    vit_like = nn.Sequential(Block(dim=8, num_heads=2))
    assert leaf_modules_for(vit_like, ds) is ds
    mixed = {"zero_optimization": {"leaf_module": {"classes": ["Block", "nowhere.Missing"]}}}
    assert leaf_modules_for(vit_like, mixed)["zero_optimization"]["leaf_module"] == {"classes": ["Block"]}
    by_name = {"zero_optimization": {"leaf_module": {"classes": ["nowhere.Missing"], "names": ["0"]}}}
    assert leaf_modules_for(dvae_like, by_name) is by_name
