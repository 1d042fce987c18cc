"""The benchmark scripts end to end at a tiny scale: `benchmarks/fmnist_pretrain_vs_scratch.py` (export, tokenizer,
MIM pretraining and both fine-tunings as real CLI processes, the result JSON complete), `benchmarks/fmnist_ablations.py`
(its four arms, on the first benchmark's tokenizer), `benchmarks/fmnist_segment_pretrained_vs_scratch.py` (MIM
on its unlabelled scenes with the first benchmark's tokenizer, then both segmentation arms), `benchmarks/throughput.py
--smoke` (every row, with speed and host syncs per step) and `benchmarks/input_pipeline.py --smoke` (every input
pipeline from a folder and from shards).

At this scale (720 training images, 72 labelled, a few dozen steps) pretraining has no reason to win, so the
test proves the pipeline, not the claim; the full run's result is in benchmarks/results/.
"""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from PIL import Image

from tests.distributed.ranks import ROOT, rank_env

STAGES = ("export", "tokenizer", "pretrain", "finetune_pretrained", "finetune_scratch", "total")


class Bench(NamedTuple):
    out_dir: Path  # the benchmark's --out-dir
    proc: subprocess.CompletedProcess
    result_file: Path


@pytest.fixture(scope="module")
def fmnist_bench(tmp_path_factory) -> Bench:
    """fmnist_pretrain_vs_scratch at --scale 0.012, run once: its tokenizer also serves the ablation benchmark."""
    tmp_path = tmp_path_factory.mktemp("fmnist_bench")
    result_file = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "benchmarks/fmnist_pretrain_vs_scratch.py", "--out-dir", str(tmp_path),
                           "--scale", "0.012", "--json", str(result_file)],
                          cwd=ROOT, env=rank_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=570)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return Bench(tmp_path, proc, result_file)


@pytest.mark.timeout(600)
def test_benchmark_pipeline_writes_both_accuracies_and_stage_times(fmnist_bench):
    tmp_path, proc, result_file = fmnist_bench
    result = json.loads(result_file.read_text())
    for key in ("top1_pretrained", "top1_scratch"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert f"pretrained {result['top1_pretrained']:.4f}, scratch {result['top1_scratch']:.4f}" in proc.stdout
    assert set(result["wall_s"]) == set(STAGES) and all(v >= 0 for v in result["wall_s"].values())
    # Each time is rounded to 0.1 s, so the sum of the rounded stages may exceed the rounded total slightly.
    assert result["wall_s"]["total"] >= sum(result["wall_s"][s] for s in STAGES if s != "total") - 0.5
    settings = result["settings"]
    assert settings["train_images"] == 720 and settings["test_images"] == 120
    assert settings["train_fraction"] == 0.1 and 64 <= settings["labelled_images"] <= 80
    # Both fine-tunings ran the same job but from different weights.
    assert settings["overrides"]["finetune_scratch"][2] == "finetune.init_from="
    assert settings["overrides"]["finetune_pretrained"][2] == "finetune.init_from=<out-dir>/pretrain"
    for stage in ("tokenizer", "pretrain", "finetune_pretrained", "finetune_scratch"):
        assert (tmp_path / stage / "summary.json").is_file() and (tmp_path / "logs" / f"{stage}.log").is_file()
    assert "no finetune.init_from: training from random initialisation" in (
        tmp_path / "logs" / "finetune_scratch.log").read_text()
    assert "initialised from" in (tmp_path / "logs" / "finetune_pretrained.log").read_text()


# The shared benchmark above (up to 570 s) runs first when this test runs alone; the ablations themselves take
# about a minute on 2 cores (7 CLI jobs, two at a time, of a few steps each), with a 3x margin below.
@pytest.mark.timeout(600 + 240)
def test_ablation_benchmark_writes_the_top1_of_all_four_arms(fmnist_bench, tmp_path):
    tokenizer = fmnist_bench.out_dir / "tokenizer" / "tokenizer.safetensors"
    result_file = tmp_path / "ablations.json"
    proc = subprocess.run([sys.executable, "benchmarks/fmnist_ablations.py", "--out-dir", str(tmp_path),
                           "--scale", "0.012", "--steps-scale", "0.002", "--tokenizer", str(tokenizer), "--jobs", "2",
                           "--json", str(result_file)],
                          cwd=ROOT, env=rank_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=210)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    arms = ("blockwise_tokens", "random_tokens", "blockwise_pixels", "scratch")
    assert set(result["top1"]) == set(result["top5"]) == set(arms)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in result["top1"].values()), result["top1"]
    for arm in arms:
        assert f"{arm:<17} {result['top1'][arm]:.4f}" in proc.stdout
        assert (tmp_path / f"finetune_{arm}" / "summary.json").is_file()
    # Same steps everywhere; the arms differ in the masking section only, the pixel arm reads no tokenizer.
    assert result["settings"]["steps"]["pretrain"]["total_steps"] == 10
    masking = {arm: result["arms"][arm]["masking"] for arm in arms[:3]}
    assert [(m["kind"], m["target"]) for m in masking.values()] == [
        ("blockwise", "tokens"), ("random", "tokens"), ("blockwise", "pixels")]
    pixels = result["pretrain"]["blockwise_pixels"]
    assert math.isfinite(pixels["masked_pixel_loss"]) and "masked_token_accuracy" not in pixels
    assert math.isfinite(result["pretrain"]["random_tokens"]["masked_token_accuracy"])
    assert "tokenizer.path=" in result["settings"]["overrides"]["pretrain_blockwise_pixels"]
    assert "initialised from" in (tmp_path / "logs" / "finetune_blockwise_pixels.log").read_text()


# The shared benchmark above (up to 570 s) runs first when this test runs alone; the segmentation benchmark itself
# took 54 s in a clean-clone CI run on 2 cores (a pretraining of 10 steps on 160 unlabelled scenes, two segmentation
# jobs of 48 steps on 16 labelled and 16 validation scenes, three process start-ups; 107 s with 40 pretraining steps,
# the margin kept), then three probe runs of a few seconds each.
@pytest.mark.timeout(600 + 330 + 180 + 30)
def test_segment_benchmark_pretrains_on_the_unlabelled_scenes_and_scores_both_arms(fmnist_bench, tmp_path):
    tokenizer = (fmnist_bench.out_dir / "tokenizer" / "tokenizer.safetensors").resolve()
    result_file = tmp_path / "segment.json"
    proc = subprocess.run([sys.executable, "benchmarks/fmnist_segment_pretrained_vs_scratch.py", "--out-dir",
                           str(tmp_path), "--scale", "0.016", "--steps-scale", "0.004", "--tokenizer", str(tokenizer),
                           "--json", str(result_file), "--jobs", "2"],
                          cwd=ROOT, env=rank_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    arms = result["arms"]
    assert set(arms) == {"pretrained", "scratch"}
    for arm in arms.values():
        assert all(math.isfinite(arm[k]) and 0.0 <= arm[k] <= 1.0 for k in ("mIoU", "mAcc", "aAcc")), arm
        assert len(arm["per_class_iou"]) == 11 and "background" in arm["per_class_iou"]
    assert (result["mIoU_pretrained"], result["mIoU_scratch"]) == (arms["pretrained"]["mIoU"], arms["scratch"]["mIoU"])
    assert f"pretrained {result['mIoU_pretrained']:.4f}, scratch {result['mIoU_scratch']:.4f}" in proc.stdout
    settings = result["settings"]
    assert settings["nominal_train_scenes"] == 160 and settings["labelled_scenes"] == 16
    assert settings["val_scenes"] == 16 and settings["pretrained"]["tokenizer"] == "given (--tokenizer)"
    assert settings["jobs"] == 2 and result["wall_s"]["segment_stage"] > 0  # the two arms at once, on 1 thread each
    # The pretraining read the 160 training scenes (the 16 labelled ones among them) and no labels, with the given
    # tokenizer (none trained here); both arms ran the same job but from different weights.
    pool = sorted((tmp_path / "data" / "unlabelled_160_seed0" / "scenes").iterdir())
    assert [p.name for p in pool] == [f"scene_{i:06d}.jpg" for i in range(160)]
    labelled = tmp_path / "data" / "scenes_16_16_seed0" / "images" / "training"
    assert all((labelled / p.name).read_bytes() == p.read_bytes() for p in pool[:16])
    assert f"tokenizer.path={tokenizer}" in settings["overrides"]["pretrain"]
    assert "data.root=<out-dir>/data/unlabelled_160_seed0" in settings["overrides"]["pretrain"]
    assert math.isfinite(settings["pretrained"]["train_masked_token_accuracy"])
    assert settings["steps"]["segment"]["total_steps"] == 48 and settings["steps_scale"] == 0.004
    assert settings["pretrained"]["steps"] == 10 and "<out-dir>/pretrain" == settings["pretrained"]["path"]
    assert settings["overrides"]["segment_pretrained"][2] == "segment.init_from=<out-dir>/pretrain"
    assert settings["overrides"]["segment_scratch"][2] == "segment.init_from="
    assert arms["pretrained"]["init_from"] and not arms["scratch"]["init_from"]
    assert not (tmp_path / "tokenizer").exists()
    assert "initialised the backbone from" in (tmp_path / "logs" / "segment_pretrained.log").read_text()
    assert "the backbone starts from random initialisation" in (tmp_path / "logs" / "segment_scratch.log").read_text()

    # The dense linear probe reads the same scenes and the pretraining's weights: 16 scenes of 64 px are 64 windows
    # of 32 px; the pretrained backbone is loaded (its probe differs from random weights').
    probe_file, scenes = tmp_path / "probe.json", str(labelled.parents[1])
    proc = subprocess.run([sys.executable, "benchmarks/fmnist_scene_patch_probe.py", "--scenes", scenes,
                           "--weights", "random", str(tmp_path / "pretrain"), "--steps", "20", "--json",
                           str(probe_file)], cwd=ROOT, env=rank_env(OMP_NUM_THREADS="2"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = json.loads(probe_file.read_text())
    assert (probe["train_windows"], probe["val_windows"]) == (64, 64) and list(probe["probes"]) == [
        "random", str(tmp_path / "pretrain")]
    for scored in probe["probes"].values():
        assert all(0.0 <= scored[k] <= 1.0 for k in ("mIoU", "mAcc", "aAcc")), scored
    assert probe["probes"]["random"] != probe["probes"][str(tmp_path / "pretrain")]
    proc = subprocess.run([sys.executable, "benchmarks/fmnist_scene_patch_probe.py", "--scenes", scenes,
                           "--weights", str(tmp_path / "segment_scratch" / "checkpoints")], cwd=ROOT,
                          env=rank_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a finished run" in proc.stderr
    proc = subprocess.run([sys.executable, "benchmarks/fmnist_scene_patch_probe.py", "--scenes", scenes,
                           "--weights", "random", "random"], cwd=ROOT, env=rank_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "named twice" in proc.stderr
    # A folder whose scenes differ in size (a scene replaced by a smaller one) is refused by name, not by torch.stack.
    odd = tmp_path / "odd_scenes"
    shutil.copytree(scenes, odd)
    for sub, suffix in (("images", "jpg"), ("annotations", "png")):
        path = odd / sub / "training" / f"scene_000003.{suffix}"
        Image.open(path).resize((48, 48), Image.NEAREST).save(path)
    proc = subprocess.run([sys.executable, "benchmarks/fmnist_scene_patch_probe.py", "--scenes", str(odd),
                           "--weights", "random", "--steps", "1"], cwd=ROOT, env=rank_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "scene 3 is (48, 48) px where scene 0 is (64, 64) px" in proc.stderr, proc.stderr


@pytest.mark.timeout(300)
def test_throughput_benchmark_smoke_writes_every_row_with_speed_and_syncs(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=rank_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows[0]["device"] == "cpu" and not [r for r in rows if "error" in r]
    speed = {r["row"]: r for r in rows[1:]}
    assert set(speed) == {"plain PyTorch", "beit_scale ZeRO-1", "beit_scale ZeRO-2", "beit_scale ZeRO-3",
                          "beit_scale ZeRO-1 + tokenizer fp32", "beit_scale ZeRO-1 + tokenizer bf16"}
    assert all(r["img_s"] > 0 and r["tflops"] > 0 and r["mfu"] is None for r in speed.values())  # no CPU peak
    assert speed["plain PyTorch"]["host_syncs_per_step"] == 0
    assert speed["beit_scale ZeRO-1"]["host_syncs_per_step"] == speed["beit_scale ZeRO-2"]["host_syncs_per_step"] == 1


@pytest.mark.timeout(120)
def test_input_pipeline_benchmark_smoke_times_every_pipeline_from_a_folder_and_shards(tmp_path):
    out = tmp_path / "input_pipeline.json"
    proc = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=rank_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] and report["settings"]["smoke"] and report["settings"]["torch_threads"] == 1
    assert report["anchor_source"].startswith(("imported", "in-file copy"))
    assert report["shard_source"] == "beit_scale.data.shards.ShardDataset"  # the shard reader, not the plain tar
    for source in ("folder", "shards"):
        rows = report["results"][source]
        assert all(rows[k]["img_s_cpu"]["median"] > 0
                   for k in ("decode", "decode_array", "reference", "today", "fast", "floor"))
        assert rows["fast_over_reference_cpu"]["median"] > 1.5  # 3.6 in the full run (results/input_pipeline_cpu.json)
    assert report["results"]["finish_cpu"]["img_s_cpu"]["median"] > 0  # the device's part, measured on the CPU
