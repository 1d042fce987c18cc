"""`beit-scale segment` on 2 real ranks: the segmenter's layer-decay groups equal plain PyTorch at ZeRO 1 and 2, and a
run on real Fashion-MNIST scenes from pretraining weights scores a finite mIoU and, killed, resumes exactly, all
through the real CLI."""
import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from beit_scale.checkpoint.export import MIM_FORMAT
from beit_scale.checkpoint.weights import save_weights
from beit_scale.data.fmnist_scenes import SCENE_CLASSES, export_fmnist_scenes
from beit_scale.models import ZOO, BeitMIM
from beit_scale.models.segmentation import BeitSegmenter
from tests.distributed.ranks import ROOT, rank_env, run_ranks, torchrun
from tests.distributed.test_finetune import cli, metadata, records

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::UserWarning:timm.layers.interpolate")]

TINY = ZOO["beit_tiny_patch4_32"]
# a run, and the layer-decay worker, take 10-15 s on 2 shared cores: the timeouts are 3x that
RUN_TIMEOUT = 45


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """32 training and 8 validation scenes of real Fashion-MNIST items (64 px canvases, 11 classes), shared by the
    tests; the quickstart recipe trains on 32 px crops of them rescaled by 0.5-2 and evaluates them at 32 px."""
    return export_fmnist_scenes(tmp_path_factory.mktemp("scenes") / "scenes", num_train=32, num_val=8, seed=0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Untrained pretraining weights of the tiny BEiT at 16 px (4x4 patches), as `beit-scale pretrain` writes them
    (lineage pt): smaller than the 32 px crop, as 224 px pretraining is than 512 px segmentation."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seg_pt") / "model.safetensors"
    save_weights(BeitMIM(TINY, vocab_size=16, img_size=16).state_dict(), path,
                 {"format": MIM_FORMAT, "model": "beit_tiny_patch4_32", "lineage": "pt"})
    return path


def segment(scenes, pretrained, out) -> list[str]:
    """The quickstart recipe, 6 steps of 8 images at ZeRO 2, evaluation at steps 3 and 6, checkpoints every 2."""
    return cli("segment", "--config", "segment_quickstart", f"run.output_dir={out}", "run.name=pt_seg",
               f"data.root={scenes}", f"segment.init_from={pretrained}", "engine.zero_stage=2",
               "train.total_steps=6", "train.micro_batch=4", "train.global_batch=8", "train.log_every=1",
               "optim.warmup_steps=1", "segment.eval_every=3", "checkpoint.every_steps=2", "data.num_workers=0")


@pytest.fixture(scope="module")
def segmented(scenes, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    proc = run_ranks(segment(scenes, pretrained, out), timeout=RUN_TIMEOUT)
    return out, proc.stderr


# ------------------------------------------------------------------------------------------------ layer decay


@pytest.fixture(scope="module")
def layer_decay_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_layer_decay") / "report.json"
    run_ranks(torchrun(2, str(ROOT / "tests/distributed/segment_step_worker.py"), str(out), "1", "2"),
              timeout=RUN_TIMEOUT)
    return json.loads(out.read_text())


def poly_lr(step: int, lr=2e-3, warmup=1, total=3) -> float:
    """The schedule written out: linear warmup from 0, then mmseg's poly (power 1) counted from step 0."""
    return lr * step / warmup if step < warmup else lr * (1 - step / total)


# Biases whose output reaches a BatchNorm through linear maps only: BN removes them, so their true gradient is 0 and
# Adam moves them by rounding noise alone (about 1e-5 here), differently in two summation orders.
BEFORE_BATCHNORM = {"fpn1.0.bias", "fpn1.3.bias", "fpn2.0.bias"}


@pytest.mark.parametrize("stage", [1, 2])
def test_segmenter_layer_decay_lrs_and_weights_after_deepspeed_equal_plain_pytorch(layer_decay_report, stage):
    r = layer_decay_report[str(stage)]
    assert r["stage"] == stage
    top = r["num_blocks"] + 1  # adapters, UperNet and the auxiliary head
    # layer 0: [CLS] (no decay), then the patch embedding; blocks: gammas and biases first; top: fpn1's weight first
    expected = [(layer, wd) for layer in range(top) for wd in (0.0, 0.05)] + [(top, 0.05), (top, 0.0)]
    for step, groups in enumerate(r["groups"]):
        assert [(g["layer_id"], g["weight_decay"]) for g in groups] == expected
        for g in groups:
            assert g["lr_scale"] == pytest.approx(0.9 ** (top - g["layer_id"]), rel=1e-12)
            assert g["lr"] == pytest.approx(poly_lr(step) * g["lr_scale"], rel=1e-9, abs=1e-15)
        assert [g["lr"] for g in groups] == [g["lr"] for g in r["ref_groups"][step]]
    for (layer, wd), names in zip(expected, r["names"]):
        if layer == 0:
            assert set(names) <= {"backbone.cls_token", "backbone.patch_embed.proj.weight",
                                  "backbone.patch_embed.proj.bias"}, names
        elif layer < top:
            assert all(n.startswith(f"backbone.blocks.{layer - 1}.") for n in names), names
        else:
            assert all(n.startswith(("fpn", "decode_head.", "auxiliary_head.")) for n in names), names
        if wd:  # decayed: weights of 2 or more dimensions, never a position table or a norm
            assert not any("relative_position" in n or n.endswith(".bias") or ".bn." in n for n in names), names
    assert sum(map(len, r["names"])) == len(r["diffs"])  # every parameter is in one group
    # fp32: gloo sums in another order than one process does (measured: 6e-8 on weights moved by 2e-3)
    assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-6)
    worst = max((d, k) for k, d in r["diffs"].items() if k not in BEFORE_BATCHNORM)
    assert worst[0] < 1e-6, worst
    assert all(r["weight_change"][k] < 1e-4 for k in BEFORE_BATCHNORM)
    moved = r["weight_change"]
    # the decay is felt: the lower the layer, the smaller the largest update of its main weight
    order = ["backbone.patch_embed.proj.weight"] + [f"backbone.blocks.{i}.mlp.fc1.weight" for i in range(4)] + [
        "decode_head.conv_seg.weight"]
    assert [moved[k] for k in order] == sorted(moved[k] for k in order)


# ----------------------------------------------------------------------------------------------------- segment


def test_segment_from_pretraining_weights_reports_finite_miou_and_writes_the_segmenter(segmented, pretrained):
    out, log = segmented
    assert f"initialised the backbone from {pretrained} (weights, trained as beit_tiny_patch4_32, lineage pt)" in log
    assert "resized to (228, 3) for window (8, 8)" in log  # the 16 px tables (4x4 patches), to the 32 px crop
    assert "layer    lr scale  weight decay" in log and "0.5905" in log  # the group table, 0.9 ** 5
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mIoU", "mAcc", "aAcc"):
        assert math.isfinite(summary[key]) and 0 <= summary[key] <= 1, key
    assert sorted(summary["per_class_iou"]) == sorted(SCENE_CLASSES)
    assert all(v is None or 0 <= v <= 1 for v in summary["per_class_iou"].values())
    sizes = (summary["val_images"], summary["num_classes"], summary["crop_px"], summary["train_images"])
    assert sizes == (8, 11, 32, 32)
    assert (summary["lineage"], summary["init_lineage"], summary["world_size"]) == ("pt_seg", "pt", 2)
    _, evals = records(out)
    assert sorted(evals) == [3, 6] and evals[6]["mIoU"] == summary["mIoU"]
    meta = metadata(out / "model.safetensors")
    assert (meta["format"], meta["parent_lineage"], meta["num_classes"], meta["img_size"]) == (
        "beit_scale.segmenter.v1", "pt", "11", "32")
    model = BeitSegmenter(TINY, 11, img_size=32, channels=32, aux_channels=32)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)


def test_killed_segment_run_resumes_with_identical_losses_evals_and_weights(segmented, scenes, pretrained, tmp_path):
    full, _ = segmented
    cmd = segment(scenes, pretrained, tmp_path)
    killed = subprocess.run(cmd, env=rank_env(BEIT_SCALE_FAULT="after_step@5"), capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, start_new_session=True)
    assert killed.returncode != 0 and "fault hook: killing rank 0" in killed.stderr
    proc = run_ranks(cmd, timeout=RUN_TIMEOUT)
    assert f"resumed from {tmp_path / 'checkpoints'}/step_000000004 at step 4" in proc.stderr
    assert "initialised the backbone" not in proc.stderr  # the checkpoint's weights, not init_from's
    # crops, flips, photometric draws, drop path and dropout replayed exactly; BatchNorm statistics too (the eval)
    assert records(tmp_path) == records(full)
    summary, reference = (json.loads((out / "summary.json").read_text()) for out in (tmp_path, full))
    same = ("mIoU", "mAcc", "aAcc", "per_class_iou", "init_lineage", "final_loss")
    assert {k: summary[k] for k in same} == {k: reference[k] for k in same} and summary["restarts"] == 1
    resumed, reference = load_file(str(tmp_path / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
