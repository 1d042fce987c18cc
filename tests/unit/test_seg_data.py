"""Segmentation data and scores: mIoU/mAcc by hand, the all-reduce over 2 gloo ranks, the Fashion-MNIST scenes
exporter, the ADE20K-layout dataset and the alignment of the training transform."""
from __future__ import annotations

import colorsys
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from beit_scale.data.fashion_mnist import DEFAULT_SOURCE_DIR, has_fashion_mnist
from beit_scale.data.fmnist_scenes import MARKER_NAME, PROGRESS_NAME, compose_scene, export_fmnist_scenes, load_pool
from beit_scale.data.segmentation import (MEAN_255, STD_255, ADE20KFolder, SegEvalTransform, SegmentationSet,
                                          SegTrainTransform, reduce_zero_label)
from beit_scale.train.seg_metrics import SegmentationMeter, all_reduce_confusion, confusion_matrix, scores

needs_fmnist = pytest.mark.skipif(not has_fashion_mnist(DEFAULT_SOURCE_DIR),
                                  reason="Debian's dataset-fashion-mnist is not installed")

# K = 5; class 3 only predicted, class 4 nowhere, one pixel ignored (its prediction 0 must not count)
LABEL = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 0]])
PRED = torch.tensor([[0, 1, 1, 1], [3, 0, 1, 0]])


def test_scores_of_a_hand_made_map_equal_the_hand_computed_values():
    matrix = confusion_matrix(PRED, LABEL, num_classes=5)
    assert matrix.sum() == 7 and matrix[0, 0] == 2 and matrix[0, 1] == 1 and matrix[2, 3] == 1
    s = scores(matrix)
    # IoU: 0 -> 2/(3+2-2), 1 -> 3/(3+4-3), 2 -> 0/1, 3 -> 0/1 (predicted only), 4 -> NaN (nowhere)
    assert s["IoU.0"] == pytest.approx(2 / 3) and s["IoU.1"] == pytest.approx(3 / 4)
    assert s["IoU.2"] == 0 and s["IoU.3"] == 0 and math.isnan(s["IoU.4"])
    assert s["mIoU"] == pytest.approx((2 / 3 + 3 / 4) / 4)
    assert math.isnan(s["Acc.3"]) and s["mAcc"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # absent labels left out
    assert s["aAcc"] == pytest.approx(5 / 7)


def test_reduce_zero_label_shifts_classes_and_ignores_zero_in_data_and_scores():
    assert reduce_zero_label(np.array([0, 1, 2, 150, 255], np.uint8)).tolist() == [255, 0, 1, 149, 255]
    raw = torch.where(LABEL == 255, 0, LABEL + 1)  # the annotation file before the shift
    assert torch.equal(confusion_matrix(PRED, raw, 5, reduce_zero_label=True), confusion_matrix(PRED, LABEL, 5))
    with pytest.raises(ValueError, match="reduce_zero_label"):
        confusion_matrix(PRED, raw, 2)  # label 2 with 2 classes: the raw map was not shifted


def test_meter_argmaxes_logits_and_sums_batches():
    meter = SegmentationMeter(5)
    logits = torch.nn.functional.one_hot(PRED, 5).permute(2, 0, 1).float()[None]  # (1, 5, 2, 4)
    meter.update(logits, LABEL[None])
    meter.update(PRED, LABEL)
    assert torch.equal(meter.matrix, 2 * confusion_matrix(PRED, LABEL, 5))
    assert meter.compute()["mIoU"] == pytest.approx((2 / 3 + 3 / 4) / 4)


def _rank_main(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        pred, label = PRED.flatten(), LABEL.flatten()
        mine = confusion_matrix(pred[rank::world], label[rank::world], 5)
        torch.save(all_reduce_confusion(mine), f"{folder}/rank{rank}.pt")
        meter = SegmentationMeter(5)
        meter.update(pred[rank::world], label[rank::world])
        torch.save(meter.compute(), f"{folder}/scores{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_confusion_all_reduce_over_two_gloo_ranks_equals_one_process(tmp_path):
    ctx = mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 gloo ranks did not finish within 60 s")
    whole = confusion_matrix(PRED, LABEL, 5)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), whole)
        got, want = torch.load(tmp_path / f"scores{rank}.pt"), scores(whole)
        assert got.keys() == want.keys()
        assert all(got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])) for k in want)


@needs_fmnist
def test_scenes_are_real_fashion_mnist_items_labelled_where_visible_and_deterministic(tmp_path):
    root = export_fmnist_scenes(tmp_path / "a", num_train=6, num_val=3, seed=7)
    for kind, ext in (("images", "jpg"), ("annotations", "png")):
        for split, n in (("training", 6), ("validation", 3)):
            assert sorted(p.name for p in (root / kind / split).iterdir()) == [f"scene_{i:06d}.{ext}" for i in range(n)]
    items, classes = load_pool("training", 10000)
    for i in range(6):
        label = np.array(Image.open(root / "annotations" / "training" / f"scene_{i:06d}.png"))
        image = np.array(Image.open(root / "images" / "training" / f"scene_{i:06d}.jpg"))
        want_image, want_label, placed = compose_scene(np.random.default_rng([7, 0, i]), items, classes)
        assert np.array_equal(label, want_label) and 2 <= len(placed) <= 4
        assert image.shape == (64, 64, 3) and np.abs(image.astype(int) - want_image).mean() < 3  # jpeg loss only
        last = placed[-1]  # painted last, so never occluded: all its bright pixels carry its class
        window = (slice(last["top"], last["top"] + last["size"]), slice(last["left"], last["left"] + last["size"]))
        item = np.asarray(Image.fromarray(items[last["pool_index"]]).resize((last["size"],) * 2, Image.BILINEAR))
        assert (label[window][item > 64] == last["class"] + 1).all() and (item > 64).sum() > 20
        assert set(np.unique(label)) <= {0} | {p["class"] + 1 for p in placed}
        assert image[label > 0].mean() > 3 * max(image[label == 0].mean(), 1)  # items bright, background dark
    again = export_fmnist_scenes(tmp_path / "b", num_train=6, num_val=3, seed=7)
    other = export_fmnist_scenes(tmp_path / "c", num_train=6, num_val=3, seed=8)
    for split, n in (("training", 6), ("validation", 3)):
        for i in range(n):
            rel = Path("annotations") / split / f"scene_{i:06d}.png"
            assert (root / rel).read_bytes() == (again / rel).read_bytes()
    assert any((root / "annotations/training" / f"scene_{i:06d}.png").read_bytes()
               != (other / "annotations/training" / f"scene_{i:06d}.png").read_bytes() for i in range(6))
    ds = ADE20KFolder(root, "validation", reduce_zero_label=False)
    assert len(ds) == 3 and ds[0][1].max() <= 10


@needs_fmnist
def test_grey_scenes_keep_the_tinted_layout_and_labels_and_are_another_export(tmp_path):
    items, classes = load_pool("training", 10000)
    tinted_image, tinted_label, tinted_placed = compose_scene(np.random.default_rng([3, 0, 0]), items, classes)
    grey_image, grey_label, grey_placed = compose_scene(np.random.default_rng([3, 0, 0]), items, classes, tint=False)
    assert grey_placed == tinted_placed and np.array_equal(grey_label, tinted_label)
    fg = grey_label > 0
    assert (grey_image[..., 0] == grey_image[..., 1]).all() and (grey_image[..., 1] == grey_image[..., 2]).all()
    assert (grey_image[fg].astype(int) >= tinted_image[fg]).all() and (grey_image[~fg] == 0).all()
    assert not (tinted_image[..., 0] == tinted_image[..., 1]).all()

    root = export_fmnist_scenes(tmp_path / "g", num_train=2, num_val=1, seed=3, tint=False)
    image = np.array(Image.open(root / "images/training/scene_000000.jpg"))
    assert np.abs(image.astype(int) - grey_image).mean() < 3
    with pytest.raises(ValueError, match="other arguments"):
        export_fmnist_scenes(root, num_train=2, num_val=1, seed=3)  # a tinted export into the grey one
    marker = json.loads((root / MARKER_NAME).read_text())
    del marker["tint"]  # as written before the option existed: a tinted export
    (root / MARKER_NAME).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="other arguments"):
        export_fmnist_scenes(root, num_train=2, num_val=1, seed=3, tint=False)
    assert export_fmnist_scenes(root, num_train=2, num_val=1, seed=3) == root


@needs_fmnist
def test_scenes_export_resumes_an_interrupted_run_and_refuses_foreign_or_other_folders(tmp_path):
    root = export_fmnist_scenes(tmp_path / "s", num_train=4, num_val=2, seed=1)
    before = {p: p.read_bytes() for p in root.rglob("scene_*")}
    # as if killed while writing scene 2: the progress marker, a partial file, scenes 2 and 3 missing
    (root / MARKER_NAME).rename(root / PROGRESS_NAME)
    for i in (2, 3):
        (root / "images/training" / f"scene_{i:06d}.jpg").unlink()
    (root / "images/training/scene_000002.tmp.jpg").write_bytes(b"partial")
    export_fmnist_scenes(root, num_train=4, num_val=2, seed=1)
    assert {p: p.read_bytes() for p in root.rglob("scene_*")} == before
    assert (root / MARKER_NAME).is_file() and not (root / PROGRESS_NAME).exists()
    assert export_fmnist_scenes(root, num_train=4, num_val=2, seed=1) == root  # complete: nothing to do

    with pytest.raises(ValueError, match="other arguments"):
        export_fmnist_scenes(root, num_train=4, num_val=2, seed=2)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export_fmnist_scenes(foreign, num_train=1, num_val=1)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    with pytest.raises(ValueError, match="num_train"):
        export_fmnist_scenes(tmp_path / "x", num_train=0, num_val=1)


def _ade(root: Path, stems: list[str], split: str = "training", size=(12, 10)) -> Path:
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    for k, stem in enumerate(stems):
        Image.new("RGB", size, (k * 40, 0, 0)).save(root / "images" / split / f"{stem}.jpg")
        label = np.full(size[::-1], k, np.uint8)
        label[0, 0] = 0
        Image.fromarray(label).save(root / "annotations" / split / f"{stem}.png")
    return root


def test_ade20k_folder_pairs_by_stem_and_reduces_zero_label(tmp_path):
    root = _ade(tmp_path, ["b", "a", "c"])
    ds = ADE20KFolder(root, "training")
    assert [Path(p).stem for p, _ in ds.samples] == ["a", "b", "c"]
    image, label = ds[1]  # "b", written with class 0 except one pixel 0
    assert image.size == (12, 10) and image.getpixel((5, 5))[0] == pytest.approx(0, abs=3)
    assert label[0, 0] == 255 and (label.flatten()[1:] == 255).all()  # all 0 -> ignored
    assert ADE20KFolder(root, "training")[2][1][5, 5] == 1  # "c": class 2 -> 1
    assert ADE20KFolder(root, "training", reduce_zero_label=False)[2][1][5, 5] == 2


def test_ade20k_folder_refuses_unpaired_files_and_missing_splits(tmp_path):
    root = _ade(tmp_path, ["a", "b"])
    Image.new("RGB", (4, 4)).save(root / "images/training/lonely.jpg")
    Image.new("L", (4, 4)).save(root / "annotations/training/orphan.png")
    with pytest.raises(ValueError, match=r"without annotation \['lonely'\].*without image \['orphan'\]"):
        ADE20KFolder(root, "training")
    with pytest.raises(FileNotFoundError, match="ADE20K layout"):
        ADE20KFolder(root, "validation")
    with pytest.raises(ValueError, match="split"):
        ADE20KFolder(root, "train")


def test_ade20k_folder_replaces_an_unreadable_or_mismatched_pair_by_the_next(tmp_path, caplog):
    root = _ade(tmp_path, ["a", "b", "c", "d"])
    (root / "images/training/b.jpg").write_bytes(b"\xff\xd8 truncated")
    Image.new("L", (3, 3)).save(root / "annotations/training/c.png")  # size differs from its image
    ds = ADE20KFolder(root, "training", reduce_zero_label=False)
    with caplog.at_level(logging.WARNING):
        assert ds[1][1][5, 5] == 3 and ds[2][1][5, 5] == 3  # both replaced by "d"
    assert "b.jpg" in caplog.text and "c.jpg" in caplog.text and "3x3" in caplog.text


def _encoded(height: int = 48, width: int = 80, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """Blocks of 8x8 px of random classes 0-9; every channel of a pixel is 20 * class + 10."""
    rng = np.random.default_rng(seed)
    label = np.kron(rng.integers(0, 10, (height // 8, width // 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
    return Image.fromarray(np.repeat((label * 20 + 10)[..., None], 3, axis=2).astype(np.uint8)), label


def _decode(image: torch.Tensor) -> torch.Tensor:
    pixels = image * torch.tensor(STD_255).view(3, 1, 1) + torch.tensor(MEAN_255).view(3, 1, 1)
    return ((pixels[0] - 10) / 20).round().long()


def test_train_transform_crops_flips_and_pads_image_and_mask_alike():
    image, label = _encoded()
    transform = SegTrainTransform(crop_px=32, scale=(80, 48), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                                  photometric=False)  # rescale by exactly 1: crop and flip only
    flips = set()
    for seed in range(12):
        ds = SegmentationSet([(image, label)], transform, seed=seed)
        sample = ds[0]
        x, y = sample["image"], sample["label"]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
        assert torch.equal(_decode(x), y)
        flips.add(bool((y[:, 0] != torch.from_numpy(label[:32, 0]).long()).any()))
    tall = SegTrainTransform(crop_px=64, scale=(80, 48), ratio_range=(1.0, 1.0), cat_max_ratio=1.0, photometric=False)
    x, y = tall(image, label)
    assert (y[48:] == 255).all() and (y != 255).sum() == 48 * 64 and (x[:, 48:] == 0).all()  # padding
    assert torch.equal(_decode(x)[:48], y[:48])


def test_train_transform_rescale_keeps_alignment_and_ratio_range():
    image, label = _encoded()
    transform = SegTrainTransform(crop_px=64, scale=(80, 48), ratio_range=(0.5, 2.0), cat_max_ratio=1.0,
                                  photometric=False)
    sides = set()
    for seed in range(8):
        sample = SegmentationSet([(image, label)], transform, seed=seed)[0]
        x, y = sample["image"], sample["label"]
        valid = y != 255
        sides.add(int(valid.any(1).sum()))  # rows: 48 px scaled by 0.5-2
        # 2 px away from block edges and crop borders (constant 5x5 neighbourhood), the bilinear image decodes to
        # the nearest-resized mask: nearest and bilinear differ by half a pixel, as cv2's do in mmseg
        padded = torch.nn.functional.pad(y[None, None].float(), (2, 2, 2, 2), value=-1.0)
        hi = torch.nn.functional.max_pool2d(padded, 5, stride=1)[0, 0]
        lo = -torch.nn.functional.max_pool2d(-padded, 5, stride=1)[0, 0]
        interior = valid & (hi == lo)
        assert interior.sum() > 0.1 * valid.sum() and torch.equal(_decode(x)[interior], y[interior])
    assert min(sides) < 64 and len(sides) > 3


def test_train_transform_photometric_changes_pixels_not_geometry_and_is_seeded():
    image, label = _encoded()
    ds = SegmentationSet([(image, label)], SegTrainTransform(crop_px=32, scale=(80, 48)), seed=3)
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a["image"])
    changed = 0
    for seed in range(6):
        plain, distorted = (SegmentationSet([(image, label)], SegTrainTransform(
            crop_px=32, scale=(80, 48), cat_max_ratio=1.0, photometric=p), seed=seed)[0] for p in (False, True))
        assert torch.equal(plain["label"], distorted["label"])  # same crop and flip: photometric draws come last
        pixels = distorted["image"] * torch.tensor(STD_255).view(3, 1, 1) + torch.tensor(MEAN_255).view(3, 1, 1)
        assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
        changed += int(not torch.equal(plain["image"], distorted["image"]))
    assert changed >= 3  # a grey image changes by brightness or contrast only: each step with probability 1/2


def _max_share(y: torch.Tensor) -> float:
    counts = torch.bincount(y[y != 255].flatten())
    return (counts.max() / counts.sum()).item()


def test_train_crop_redraws_while_one_class_covers_75_percent():
    label = np.ones((64, 64), np.uint8)
    label[48:] = 2  # a crop of 32 rows is mixed enough only for tops 25-32 (8 of 33)
    image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))

    def shares(ratio: float) -> list[float]:
        t = SegTrainTransform(crop_px=32, scale=(64, 64), ratio_range=(1, 1), cat_max_ratio=ratio, flip_prob=0,
                              photometric=False)
        return [_max_share(SegmentationSet([(image, label)], t, seed=s)[0]["label"]) for s in range(30)]

    balanced, plain = shares(0.75), shares(1.0)
    assert sum(s < 0.75 for s in balanced) >= 25 and sum(s < 0.75 for s in plain) <= 15


def test_eval_transform_rescales_the_image_keeping_ratio_and_leaves_the_label():
    image, label = _encoded(height=48, width=80)
    x, y = SegEvalTransform(scale=(2048, 512))(image, label)
    assert x.shape == (3, 512, 853) and torch.equal(y, torch.from_numpy(label).long())  # 48 -> 512, 80 -> 853


def test_photometric_hsv_steps_match_colorsys_and_hue_turns_red_green():
    from beit_scale.data.segmentation import _hsv_to_rgb, _rgb_to_hsv

    x = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    hsv = _rgb_to_hsv(x)
    ref = torch.tensor([colorsys.rgb_to_hsv(*x[:, i, j].tolist()) for i in range(6) for j in range(6)])
    assert torch.allclose(hsv.reshape(3, -1).T, ref, atol=1e-6) and torch.allclose(_hsv_to_rgb(hsv), x, atol=1e-6)
    red = _rgb_to_hsv(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))
    red[0] = (red[0] + 60 / 180) % 1.0  # mmseg's hue delta is in cv2's 180 steps: 60 of them are 120 degrees
    assert torch.allclose(_hsv_to_rgb(red).flatten(), torch.tensor([0.0, 1.0, 0.0]))
