"""FastTwoViewTransform against the reference TwoViewTransform: the same random draws, crop box and flip, pixels
within measured bounds on photos and Fashion-MNIST, and a tokenizer view that is the patch view downsampled.

Pixel differences are in grey levels (1/255): the mean absolute difference of a view, averaged over the channels.
Where they come from (data/fast_views.py): the jitter applied after the resize instead of before (PIL's clip meets
the resize's overshoot in the other order, at edges; not for boxes the resize enlarges), PIL's truncations emulated
by -0.5, torch's bicubic against PIL's (within a level), contrast's grey mean read from ~4,096 pixels (within a
level), and for the tokenizer view of a box larger than it a box average of the bicubic patch view (or a bicubic
resize) instead of lanczos.
"""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageStat
from torchvision.transforms import ColorJitter, RandomResizedCrop

from beit_scale.config import load_config
from beit_scale.data import SafeImageFolder, TwoViewTransform, export_fashion_mnist
from beit_scale.data import fast_views
from beit_scale.data.fast_views import FastTwoViewTransform, takes_arrays, two_view_transform
from beit_scale.data.folder import decode_rgb, decode_rgb_array

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def photos():
    """scikit-learn's two sample photos (640x427, real JPEG content)."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="pip install '.[test]' (scikit-learn)")
    return [Image.fromarray(a) for a in sklearn_datasets.load_sample_images().images]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install dataset-fashion-mnist")
    folder = SafeImageFolder(str(export_fashion_mnist(tmp_path_factory.mktemp("fmnist"), "test", limit=48)))
    return [folder[i][0] for i in range(len(folder))]


def differences(images, img_size, tok_size, seeds, **kwargs):
    """(patch, tokenizer) view mean absolute differences in grey levels, one per seed, with the same seed for both
    transforms; also checks that both left torch's RNG in the same state (the same draws)."""
    ref, fast = TwoViewTransform(img_size, tok_size, **kwargs), FastTwoViewTransform(img_size, tok_size, **kwargs)
    patch, tok = [], []
    for seed in range(seeds):
        img = images[seed % len(images)]
        torch.manual_seed(seed)
        ref_patch, ref_tok = ref(img)
        after_ref = torch.get_rng_state()
        torch.manual_seed(seed)
        fast_patch, fast_tok = fast(img)
        assert torch.equal(torch.get_rng_state(), after_ref), seed
        patch.append(((ref_patch - fast_patch) * STD * 255).abs().mean().item())
        tok.append(((ref_tok - fast_tok) * 255).abs().mean().item())
    return np.array(patch), np.array(tok)


def test_fast_makes_the_reference_draws_in_order_and_cuts_the_same_boxes(monkeypatch):
    """Every ColorJitter and RandomResizedCrop draw (order, factors, box) equal, and the same RNG state after."""
    calls = {"ref": [], "fast": []}
    who = ["ref"]
    jitter, crop = ColorJitter.get_params, RandomResizedCrop.get_params

    def jitter_spy(*args):
        out = jitter(*args)
        calls[who[0]].append(("jitter", out[0].tolist(), out[1:]))
        return out

    def crop_spy(img, scale, ratio):
        out = crop(img, scale, ratio)
        calls[who[0]].append(("box", tuple(TF.get_dimensions(img)), out))  # fast passes a stand-in of that size
        return out

    monkeypatch.setattr(ColorJitter, "get_params", staticmethod(jitter_spy))
    monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(crop_spy))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((48, 64), (90, 40))]
    for kwargs in ({}, {"color_jitter": 0.0, "hflip": 1.0}, {"scale": (0.3, 0.6), "hflip": 0.0}):
        ref, fast = TwoViewTransform(32, 16, **kwargs), FastTwoViewTransform(32, 16, **kwargs)
        for seed in range(60):
            img = images[seed % 2]
            for who[0], transform in (("ref", ref), ("fast", fast)):
                torch.manual_seed(seed)
                transform(img)
                calls[who[0]].append(("state", bytes(torch.get_rng_state().numpy())))
    assert calls["fast"] == calls["ref"] and len(calls["ref"]) > 400


def test_without_jitter_the_patch_view_is_the_reference_crop_and_flip(photos):
    """Flip and box identical: what is left is torch's bicubic against PIL's (measured 0.025 levels on average,
    0.25 at worst; a box one pixel off costs 1.6 to 7 levels on these photos, a wrong flip 20 or more)."""
    for hflip in (0.0, 1.0):
        patch, _ = differences(photos, 224, 112, 8, color_jitter=0.0, hflip=hflip)
        assert patch.mean() < 0.1 and patch.max() < 0.5, (hflip, patch)


def test_photo_views_are_within_bounds_of_the_reference(photos):
    """Jitter 0.4, 224/112 px (measured over 200 seeds: patch 0.63 levels on average, 2.3 at worst; tokenizer view
    1.8 and 4.6: its box-of-bicubic filter alone is 1.8 against lanczos)."""
    patch, tok = differences(photos, 224, 112, 24)
    assert patch.mean() < 1.0 and patch.max() < 3.0, patch
    assert tok.mean() < 2.5 and tok.max() < 6.0, tok


def test_an_enlarged_box_is_jittered_first_and_its_tokenizer_view_is_lanczos_as_in_the_reference(photos):
    """A box smaller than both views goes the reference's way (jitter, then resize; lanczos for the tokenizer view),
    so only the emulated truncations and torch's bicubic differ (80x60 photos, 96 px views, measured over 100
    seeds: patch 0.31 levels on average, 0.50 at worst; tokenizer view 0.35 and 0.54)."""
    small = [photo.resize((80, 60), Image.Resampling.BOX) for photo in photos]
    patch, tok = differences(small, 96, 96, 30)
    assert patch.mean() < 0.5 and patch.max() < 1.0, patch
    assert tok.mean() < 0.5 and tok.max() < 1.0, tok


@needs_fmnist
def test_fashion_mnist_views_are_within_bounds_of_the_reference(fmnist):
    """The quickstart's 32 px views of 28 px images: every box is enlarged, so both views go the reference's way
    (measured over 400 seeds: patch 0.35 levels on average, 1.0 at worst; tokenizer view 0.36 and 1.0)."""
    patch, tok = differences(fmnist, 32, 32, 160)
    assert patch.mean() < 0.6 and patch.max() < 2.0, patch
    assert tok.mean() < 0.6 and tok.max() < 2.0, tok


def unnormalised(patch):
    return patch * STD + MEAN


@pytest.mark.parametrize("img_size, tok_size", [(224, 112), (32, 32), (48, 16)])
def test_the_tokenizer_view_is_the_patch_view_box_averaged(photos, img_size, tok_size):
    """Boxes larger than the tokenizer view (here at least 320 px): its pixels are the patch view's, averaged."""
    fast = FastTwoViewTransform(img_size, tok_size, scale=(0.5, 1.0))
    for seed in range(4):
        torch.manual_seed(seed)
        patch, tok = fast(photos[seed % 2])
        k = img_size // tok_size
        expected = F.avg_pool2d(unnormalised(patch)[None], k)[0]
        assert tok.shape == (3, tok_size, tok_size) and torch.allclose(tok, expected, atol=1e-5)


def test_a_tokenizer_size_that_does_not_divide_gets_its_own_resize_of_the_same_box(photos):
    """224/96: the box resized twice; the tokenizer view is then the patch view area-downsampled within the two
    filters' difference (measured 2.0 levels on average, 3.3 at worst)."""
    fast = FastTwoViewTransform(224, 96)
    for seed in range(6):
        torch.manual_seed(seed)
        patch, tok = fast(photos[seed % 2])
        expected = F.interpolate(unnormalised(patch).clamp(0, 1)[None], (96, 96), mode="area")[0]
        assert ((tok - expected) * 255).abs().mean() < 4.0


def test_composed_colour_maps_equal_the_enhancers_clipped_one_by_one():
    """_Plan merges the enhancers into as few passes as clipping allows: the result equals applying each one with
    its clip to [0, 255] (and the -0.5 of its truncation) within BIND_TOLERANCE (measured 0.85 levels at worst over
    3,000 random chains with factors in [0, 2])."""
    rng = np.random.default_rng(0)
    grey = np.array(fast_views.GREY)
    for _ in range(300):
        x = rng.integers(0, 256, (3, 64)).astype(np.uint8)
        mean, plan, y = float(rng.integers(0, 256)), fast_views._Plan(), x.astype(np.float64)
        for op in rng.permutation(3):
            f = float(rng.uniform(0.0, 2.0))
            alpha, beta, gamma = {0: (f, 0.0, -0.5), 1: (f, 0.0, (1 - f) * mean - 0.5), 2: (f, 1 - f, -0.5)}[op]
            plan.add(alpha, beta, gamma)
            y = np.clip(alpha * y + beta * (grey @ y) + gamma, 0, 255)  # brightness, contrast, saturation
        plan_row = fast_views._plan_tensor(plan.segments(), 0.0)[None]  # (1, PLAN_SIZE)
        composed = fast_views._apply_plan(torch.from_numpy(x).float().view(1, 3, 64, 1), plan_row)
        assert np.abs(composed.numpy().reshape(3, 64) - y).max() <= fast_views.BIND_TOLERANCE


def pil_grey_mean(img, done):
    for op, f in done:
        img = TF.adjust_brightness(img, f) if op == 0 else TF.adjust_saturation(img, f)
    return int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)  # as ImageEnhance.Contrast


def test_contrast_grey_mean_is_pils_within_one_level(photos, monkeypatch):
    """Sampled (~4,096 of the 273,280 pixels): equal 81% of the time, never more than 1 level off; from every
    pixel: equal but at a rounding tie (PIL averages rounded greys)."""
    rng = np.random.default_rng(0)
    cases = [(photos[i % 2], [(int(op), float(rng.uniform(0.6, 1.4))) for op in rng.permutation([0, 2])[:i % 3]])
             for i in range(12)]
    sampled = np.array([fast_views._grey_mean(np.asarray(img), done) - pil_grey_mean(img, done)
                        for img, done in cases])
    assert np.abs(sampled).max() <= 1
    monkeypatch.setattr(fast_views, "MEAN_SAMPLE_PX", 10**9)
    every = np.array([fast_views._grey_mean(np.asarray(img), done) - pil_grey_mean(img, done) for img, done in cases])
    assert np.abs(every).max() <= 1 and (every == 0).mean() >= 0.9


def test_outputs_have_the_reference_shapes_dtypes_and_ranges():
    rng = np.random.default_rng(1)
    grey = Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8))  # "L": converted like the reference
    for img in (grey, Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))):
        torch.manual_seed(0)
        patch, tok = FastTwoViewTransform(64, 32, tokenizer_pixel_map=lambda x: 0.8 * x + 0.1)(img)
        assert patch.dtype == tok.dtype == torch.float32 and patch.is_contiguous() and tok.is_contiguous()
        assert patch.shape == (3, 64, 64) and tok.shape == (3, 32, 32)
        assert 0.1 - 1e-6 <= tok.min() and tok.max() <= 0.9 + 1e-6  # [0, 1] through the pixel map
        low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
        assert (patch >= low - 1e-5).all() and (patch <= high + 1e-5).all()


def test_data_transform_names_the_training_transform():
    assert type(two_view_transform("fast", 32, 16)) is FastTwoViewTransform and two_view_transform("fast", 32, 16).defer
    assert type(two_view_transform("reference", 32, 16)) is TwoViewTransform
    with pytest.raises(ValueError, match="data.transform='pil' must be one of fast, reference"):
        two_view_transform("pil", 32, 16)
    assert load_config("quickstart_pretrain").data.transform == "fast"  # the default
    assert load_config("quickstart_pretrain", ["data.transform=reference"]).data.transform == "reference"
    with pytest.raises(ValueError, match=r"data\.transform='pil' must be one of 'fast', 'reference'"):
        load_config("quickstart_pretrain", ["data.transform=pil"])


def _jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def test_array_decode_gives_pils_pixels_and_errors(photos):
    """libjpeg-turbo through simplejpeg for YCbCr and grey JPEGs, PIL for the rest: the same pixels as
    `decode_rgb` in every case, and a damaged file raises what `decode_rgb` raises."""
    photo = photos[0]
    rgba = Image.fromarray(np.asarray(photo)[:40, :50]).convert("RGBA")
    cases = {"baseline": _jpeg(photo, quality=90), "progressive": _jpeg(photo, progressive=True),
             "subsampling 4:4:4": _jpeg(photo, subsampling=0), "grey": _jpeg(photo.convert("L")),
             "cmyk": _jpeg(photo.convert("CMYK")), "png with alpha": _png(rgba),
             "palette png": _png(rgba.convert("RGB").convert("P"))}
    for name, data in cases.items():
        array = decode_rgb_array(data)
        assert array.dtype == np.uint8 and array.shape[2] == 3, name
        assert np.array_equal(array, np.asarray(decode_rgb(data))), name
    truncated = cases["baseline"][: len(cases["baseline"]) // 3]
    with pytest.raises(OSError) as by_pil:
        decode_rgb(truncated)
    with pytest.raises(type(by_pil.value)):
        decode_rgb_array(truncated)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_arrays_and_pil_images_give_the_same_views(photos):
    fast = FastTwoViewTransform(64, 32)
    for seed in range(6):
        img = photos[seed % 2]
        torch.manual_seed(seed)
        from_pil = fast(img)
        torch.manual_seed(seed)
        from_array = fast(np.asarray(img))
        assert all(torch.equal(a, b) for a, b in zip(from_pil, from_array))
    with pytest.raises(TypeError, match=r"\(H, W, 3\) uint8 RGB array"):
        fast(np.zeros((8, 8), dtype=np.uint8))


@pytest.mark.parametrize("img_size,tok_size", [(64, 32), (48, 20)])  # box-averaged tokenizer view / its own resize
def test_deferred_views_finished_as_a_batch_equal_the_per_sample_views(photos, img_size, tok_size):
    """The loader hands over uint8 views and a plan; `finish_batch` on the device gives the views `__call__` gives,
    for crops the resize reduces, enlarges (jittered before it), and smaller than the tokenizer view (lanczos)."""
    kwargs = dict(scale=(0.0002, 1.0), tokenizer_pixel_map=lambda x: 0.8 * x + 0.1)
    eager, deferred = FastTwoViewTransform(img_size, tok_size, **kwargs), FastTwoViewTransform(
        img_size, tok_size, defer=True, **kwargs)
    images = [photos[0], photos[1].resize((80, 60))]  # the small one: boxes under both view sizes
    samples, expected = [], []
    for seed in range(24):
        torch.manual_seed(seed)
        expected.append(eager(images[seed % 2]))
        torch.manual_seed(seed)
        patch, tok, plan = deferred(images[seed % 2])
        assert patch.dtype == tok.dtype == torch.uint8 and plan.shape == (fast_views.PLAN_SIZE,)
        samples.append({"image": patch, "tokenizer_view": tok, "view_plan": plan})
    batch = fast_views.finish_batch(torch.utils.data.default_collate(samples), deferred, torch.device("cpu"))
    assert "view_plan" not in batch and batch["image"].dtype == torch.float32
    assert torch.allclose(batch["image"], torch.stack([p for p, _ in expected]), atol=1e-5)
    assert torch.allclose(batch["tokenizer_view"], torch.stack([t for _, t in expected]), atol=1e-5)
    # both routes to the tokenizer view were taken where the sizes allow them
    plans = torch.stack([s["view_plan"] for s in samples])
    assert (plans[:, 0] == 1).any() == (img_size % tok_size == 0) and (plans[:, 0] == 0).any()


def test_a_dataset_decodes_to_arrays_for_the_fast_transform(tmp_path, photos):
    for cls, img in zip("ab", photos):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.jpg").write_bytes(_jpeg(img))
    data = _jpeg(photos[0])
    (tmp_path / "a" / "y.jpg").write_bytes(data[: len(data) // 2])  # truncated: skipped as by the PIL path
    pil, arrays = SafeImageFolder(tmp_path), SafeImageFolder(tmp_path, arrays=True)
    for i in range(3):
        assert isinstance(arrays[i][0], np.ndarray) and np.array_equal(arrays[i][0], np.asarray(pil[i][0]))
    assert arrays.bad_paths == pil.bad_paths == {str(tmp_path / "a" / "y.jpg")}
    assert takes_arrays(two_view_transform("fast", 32, 16))
    assert not takes_arrays(two_view_transform("reference", 32, 16))
