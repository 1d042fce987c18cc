"""Unit tests for beit_scale.data: SafeImageFolder, two-view transforms, MIMDataset, Fashion-MNIST export."""

from __future__ import annotations

import gzip
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset

from beit_scale.data import (
    FASHION_MNIST_CLASSES,
    EvalTwoView,
    MIMDataset,
    SafeImageFolder,
    TwoViewTransform,
    export_fashion_mnist,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _solid(value: int, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (20, 16), value if mode == "L" else (value, 255 - value, value // 2))


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.fixture
def bad_folder(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """3 classes; sorted sample order and (in brackets) what each file is:

    0 a/00.png [ok]  1 a/01.jpg [truncated JPEG]  2 a/02.jpg [garbage bytes]  3 a/03.png [ok]
    4 b/00.jpg [ok]  5 b/01.png [ok]  6 c/00.png [ok, grayscale]  7 c/01.png [0 bytes]
    """
    root = tmp_path / "imagenet"
    for c in "abc":
        (root / c).mkdir(parents=True)
    _solid(10).save(root / "a" / "00.png")
    (root / "a" / "01.jpg").write_bytes(_truncated_jpeg())
    (root / "a" / "02.jpg").write_bytes(b"this is not an image" * 10)
    _solid(40).save(root / "a" / "03.png")
    _solid(70).save(root / "b" / "00.jpg", quality=100)
    _solid(100).save(root / "b" / "01.png")
    _solid(130, mode="L").save(root / "c" / "00.png")
    (root / "c" / "01.png").write_bytes(b"")
    bad = {"truncated": root / "a" / "01.jpg", "garbage": root / "a" / "02.jpg", "empty": root / "c" / "01.png"}
    return root, bad


def _same_sample(x: tuple[Image.Image, int], y: tuple[Image.Image, int]) -> bool:
    return x[1] == y[1] and np.array_equal(np.asarray(x[0]), np.asarray(y[0]))


# ---------------------------------------------------------------- SafeImageFolder


def test_safe_folder_substitutes_next_readable_index_and_warns_once_with_path(bad_folder, caplog):
    root, bad = bad_folder
    caplog.set_level(logging.WARNING, logger="beit_scale.data.folder")
    ds = SafeImageFolder(root)
    assert len(ds) == 8
    # Load readable samples first, then the bad ones, twice.
    good = {i: ds[i] for i in (0, 3, 4, 5, 6)}
    for _ in range(2):
        assert _same_sample(ds[1], good[3])  # truncated -> skips garbage index 2 -> 3
        assert _same_sample(ds[2], good[3])
        assert _same_sample(ds[7], good[0])  # last index wraps around
    assert ds[1][1] == ds.class_to_idx["a"] and ds[7][1] == ds.class_to_idx["a"]
    assert ds.bad_paths == {str(p) for p in bad.values()}

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    for path in bad.values():
        hits = [r for r in warnings if str(path) in r.getMessage()]
        assert len(hits) == 1, f"{path} warned {len(hits)} times"
    truncated_msg = next(r.getMessage() for r in warnings if str(bad["truncated"]) in r.getMessage())
    assert "truncated" in truncated_msg  # the reason is logged too

    # A second instance (another worker) maps bad indices to the same substitutes, without re-warning.
    caplog.clear()
    other = SafeImageFolder(root)
    for i in range(len(ds)):
        assert _same_sample(other[i], ds[i])
    assert other.bad_paths == ds.bad_paths
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_safe_folder_images_are_rgb_including_grayscale(bad_folder):
    root, _ = bad_folder
    img, label = SafeImageFolder(root)[6]
    assert img.mode == "RGB" and img.size == (20, 16) and label == 2
    assert np.all(np.asarray(img) == 130)


def test_safe_folder_applies_transforms_to_substitute(bad_folder):
    root, _ = bad_folder
    ds = SafeImageFolder(root, transform=lambda im: np.asarray(im)[0, 0, 0], target_transform=lambda t: t + 10)
    assert ds[2] == (40, 10)  # a/03.png red value, class a + 10


def test_safe_folder_all_unreadable_raises_runtime_error(tmp_path):
    for c in "xy":
        (tmp_path / c).mkdir()
        (tmp_path / c / "bad.png").write_bytes(b"\x89PNG garbage")
    ds = SafeImageFolder(tmp_path)
    with pytest.raises(RuntimeError, match="all 2 images .* unreadable") as e:
        ds[0]
    assert str(tmp_path / "x" / "bad.png") in str(e.value) and str(tmp_path / "y" / "bad.png") in str(e.value)


def test_safe_folder_too_many_consecutive_failures_names_paths(tmp_path):
    (tmp_path / "k").mkdir()
    for i in range(3):
        (tmp_path / "k" / f"{i}.jpg").write_bytes(b"")
    _solid(1).save(tmp_path / "k" / "3.png")
    with pytest.raises(RuntimeError, match="max_consecutive_failures=2") as e:
        SafeImageFolder(tmp_path, max_consecutive_failures=2)[0]
    assert all(str(tmp_path / "k" / f"{i}.jpg") in str(e.value) for i in range(3))
    assert SafeImageFolder(tmp_path, max_consecutive_failures=3)[0][0].size == (20, 16)


def test_safe_folder_missing_or_empty_root_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*ROOT/<class>/<image>\.JPEG"):
        SafeImageFolder(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"no class folders.*ROOT/<class>/<image>\.JPEG"):
        SafeImageFolder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"holds no images.*ROOT/<class>/<image>\.JPEG"):
        SafeImageFolder(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        SafeImageFolder(tmp_path / "cls" / "notes.txt")


# ---------------------------------------------------------------- transforms


def _gradient_image(width: int = 96, height: int = 80) -> Image.Image:
    """Smooth, position-revealing image: red grows left to right, green top to bottom."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def test_two_view_shapes_dtypes_and_ranges():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    torch.manual_seed(0)
    patch, tok = TwoViewTransform(32, 16)(img)
    assert patch.shape == (3, 32, 32) and patch.dtype == torch.float32
    assert tok.shape == (3, 16, 16) and tok.dtype == torch.float32
    assert patch.min() < 0 < patch.max()  # normalised
    assert 0.0 <= tok.min() and tok.max() <= 1.0


def test_two_view_applies_tokenizer_pixel_map_and_is_seedable():
    img = _gradient_image()
    eps = 0.1

    def run(pixel_map):
        torch.manual_seed(3)
        return TwoViewTransform(32, 16, tokenizer_pixel_map=pixel_map)(img)

    patch_a, tok_a = run(None)
    patch_b, tok_b = run(lambda x: (1 - 2 * eps) * x + eps)
    assert torch.equal(patch_a, patch_b)  # same seed -> same augmentation
    torch.testing.assert_close(tok_b, (1 - 2 * eps) * tok_a + eps)


@pytest.mark.parametrize("hflip, left_is_white", [(1.0, True), (0.0, False)])
def test_two_view_flip_is_shared_by_both_views(hflip, left_is_white):
    half = np.zeros((64, 64, 3), dtype=np.uint8)
    half[:, 32:] = 255  # left black, right white
    t = TwoViewTransform(32, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=hflip, color_jitter=0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        patch, tok = t(Image.fromarray(half))
        patch = patch * STD + MEAN
        left_patch, left_tok = patch[:, :, :14].mean().item(), tok[:, :, :7].mean().item()
        assert (left_patch > 0.95) == left_is_white and (left_patch < 0.05) != left_is_white
        assert (left_tok > 0.95) == left_is_white and (left_tok < 0.05) != left_is_white


def _view_mismatch(patch: torch.Tensor, tok: torch.Tensor) -> float:
    """Max abs difference between the tokenizer view and the de-normalised patch view at its size."""
    small = F.interpolate((patch * STD + MEAN)[None], size=tok.shape[-2:], mode="area")[0]
    return (small - tok).abs().max().item()


def test_two_view_views_come_from_the_same_random_crop():
    img = _gradient_image()
    t = TwoViewTransform(32, 16, scale=(0.1, 0.6))
    views = []
    for seed in range(6):
        torch.manual_seed(seed)
        views.append(t(img))
        assert _view_mismatch(*views[-1]) < 0.02, f"seed {seed}: views show different regions"
    # Sensitivity check: views of two different crops do disagree by far more than the tolerance.
    assert max(_view_mismatch(views[i][0], views[i + 1][1]) for i in range(5)) > 0.2


def test_eval_two_view_is_deterministic_center_crop_of_one_region():
    img = _gradient_image()
    e = EvalTwoView(32, 16, tokenizer_pixel_map=lambda x: x * 2 - 1)
    patch, tok = e(img)
    patch2, tok2 = e(img)
    assert torch.equal(patch, patch2) and torch.equal(tok, tok2)
    assert patch.shape == (3, 32, 32) and tok.shape == (3, 16, 16)
    assert -1.0 <= tok.min() and tok.max() <= 1.0
    assert _view_mismatch(patch, (tok + 1) / 2) < 0.02
    # Centre crop of an 96x80 image: red (x position) is symmetric around the middle.
    red = (patch * STD + MEAN)[0]
    assert abs(red.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=0, tokenizer_size=16), "img_size"),
        (dict(img_size=32, tokenizer_size=16, scale=(0.5, 0.1)), "scale"),
        (dict(img_size=32, tokenizer_size=16, hflip=1.5), "hflip"),
        (dict(img_size=32, tokenizer_size=16, color_jitter=-1), "color_jitter"),
        (dict(img_size=32, tokenizer_size=16, std=(1, 0, 1)), "std"),
    ],
)
def test_two_view_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TwoViewTransform(**kwargs)


# ---------------------------------------------------------------- MIMDataset


class _NoiseImages(Dataset):
    def __init__(self, n: int = 6):
        rng = np.random.default_rng(7)
        self.images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


def _fixed_count_mask(rng: np.random.Generator) -> np.ndarray:
    return (rng.permutation(16) < 5).reshape(4, 4)  # exactly 5 of 4x4 patches


def _mim(seed: int = 0, mask_generator=_fixed_count_mask) -> MIMDataset:
    return MIMDataset(_NoiseImages(), TwoViewTransform(32, 16), mask_generator, seed=seed)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_mim_sample_is_pure_function_of_seed_epoch_index():
    first, second = _mim(), _mim()
    first.set_epoch(2)
    second.set_epoch(2)
    forward = [first[i] for i in range(6)]
    torch.manual_seed(999)  # global RNG state must not matter
    backward = [second[i] for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward):
        assert _equal(a, b)

    second.set_epoch(3)
    other_epoch = second[0]
    assert not torch.equal(other_epoch["image"], forward[0]["image"])
    assert not torch.equal(other_epoch["mask"], forward[0]["mask"])
    assert not torch.equal(_mim(seed=1)[0]["image"], _mim(seed=0)[0]["image"])


def test_mim_does_not_disturb_global_rng():
    ds = _mim()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ds[0]
    assert torch.equal(torch.rand(3), expected)


def test_mim_mask_has_generator_count_and_contract():
    ds = _mim()
    ds.set_epoch(4)
    sample = ds[3]
    assert sample["mask"].dtype == torch.bool and sample["mask"].shape == (16,)
    assert int(sample["mask"].sum()) == 5
    expected = _fixed_count_mask(np.random.default_rng([0, 4, 3])).reshape(-1)
    assert np.array_equal(sample["mask"].numpy(), expected)
    assert sample["index"] == 3 and sample["label"] == 0
    assert sample["image"].shape == (3, 32, 32) and sample["tokenizer_view"].shape == (3, 16, 16)


def test_mim_without_mask_generator_omits_mask_and_rejects_bad_masks():
    assert "mask" not in _mim(mask_generator=None)[0]
    with pytest.raises(ValueError, match="bool array"):
        _mim(mask_generator=lambda rng: rng.random((4, 4)))[0]
    with pytest.raises(ValueError, match="epoch"):
        _mim().set_epoch(-1)


def test_mim_same_samples_with_and_without_workers():
    ds = _mim()
    ds.set_epoch(1)
    in_process = next(iter(DataLoader(ds, batch_size=6, num_workers=0)))
    with_workers = next(iter(DataLoader(ds, batch_size=6, num_workers=2, multiprocessing_context="fork")))
    assert in_process["mask"].shape == (6, 16) and in_process["image"].shape == (6, 3, 32, 32)
    assert _equal(in_process, with_workers)


# ---------------------------------------------------------------- Fashion-MNIST export


def _decode_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)[offset:]


@needs_fmnist
def test_export_fashion_mnist_writes_limit_images_with_correct_labels(tmp_path):
    split_dir = export_fashion_mnist(tmp_path, split="test", limit=40)
    assert split_dir == tmp_path / "test"
    files = sorted(split_dir.glob("*/*.png"))
    assert len(files) == 40
    labels = _decode_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", 8)[:40]
    pixels = _decode_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz", 16)[: 40 * 784].reshape(40, 28, 28)
    for f in files:
        i = int(f.stem)
        assert f.parent.name == FASHION_MNIST_CLASSES[labels[i]]
        assert np.array_equal(np.asarray(Image.open(f)), pixels[i])
    ds = SafeImageFolder(split_dir)  # ImageFolder indexes the class folders alphabetically
    assert len(ds) == 40
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (28, 28)
    assert ds.classes[label] == Path(ds.samples[0][0]).parent.name


@needs_fmnist
def test_export_fashion_mnist_is_idempotent_and_reexports_on_new_limit(tmp_path):
    split_dir = export_fashion_mnist(tmp_path, split="test", limit=30)
    stamps = {f: f.stat().st_mtime_ns for f in split_dir.rglob("*")}
    assert export_fashion_mnist(tmp_path, split="test", limit=30) == split_dir
    assert {f: f.stat().st_mtime_ns for f in split_dir.rglob("*")} == stamps
    export_fashion_mnist(tmp_path, split="test", limit=12)
    assert sorted(int(f.stem) for f in split_dir.glob("*/*.png")) == list(range(12))


def test_export_fashion_mnist_missing_source_gives_apt_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        export_fashion_mnist(tmp_path / "out", split="train", limit=5, source_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="split"):
        export_fashion_mnist(tmp_path / "out", split="val", source_dir=tmp_path)


# ---------------------------------------------------------------- folders nobody curated


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def test_listing_keeps_torchvisions_order_on_a_nested_folder(tmp_path):
    import torchvision

    for rel in ("b/x.png", "a/z.png", "a/sub/y.png", "a/sub-2/w.png", "a/sub/deeper/v.png", "a/B.PNG"):
        _png(tmp_path / rel)
    assert SafeImageFolder(tmp_path).samples == torchvision.datasets.ImageFolder(str(tmp_path)).samples


def test_link_cycles_and_aliases_neither_multiply_nor_relabel_images(tmp_path, caplog):
    _png(tmp_path / "a" / "x.png")
    _png(tmp_path / "b" / "y.png")
    (tmp_path / "a" / "loop").symlink_to("..")  # a cycle through the root: torchvision lists x.png 41 times
    (tmp_path / "b" / "alias").symlink_to("../a")  # a's images would also be labelled b
    with caplog.at_level(logging.WARNING):
        ds = SafeImageFolder(tmp_path)
    assert ds.samples == [(str(tmp_path / "a" / "x.png"), 0), (str(tmp_path / "b" / "y.png"), 1)]
    assert "left out 3 folders reached again through links (read once)" in caplog.text


def test_a_fifo_named_like_an_image_is_left_out_instead_of_blocking_a_loader(tmp_path, caplog):
    import os

    _png(tmp_path / "a" / "x.png")
    os.mkfifo(tmp_path / "a" / "y.png")  # opening it would wait for a writer forever
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        ds = SafeImageFolder(tmp_path)
    assert [p for p, _ in ds.samples] == [str(tmp_path / "a" / "x.png")] and ds[0][0].size == (8, 8)
    assert "left out 1 entries that are not regular files (FIFOs, sockets, devices)" in caplog.text
    assert "left out 1 files without an image extension" in caplog.text


def test_16_bit_images_keep_their_top_8_bits_instead_of_clipping_to_white(tmp_path):
    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # up to 63000
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "deep.png")
    img, _ = SafeImageFolder(tmp_path)[0]
    assert np.array_equal(np.asarray(img)[..., 0], (pixels >> 8).astype(np.uint8))


def test_32_bit_images_are_reported_not_guessed(tmp_path, caplog):
    _png(tmp_path / "a" / "ok.png", 7)
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "a" / "wide.tiff")
    with caplog.at_level(logging.WARNING):
        img, _ = SafeImageFolder(tmp_path)[1]  # wide.tiff sorts after ok.png: replaced by the next readable
    assert np.asarray(img)[0, 0, 0] == 7
    assert "wide.tiff (ValueError: I-mode (32-bit) image has no agreed 8-bit range" in caplog.text
