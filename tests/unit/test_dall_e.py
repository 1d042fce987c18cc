"""DALL-E's encoder as a tokenizer: the official package's ids, from a file converted without trusting its pickle.

The reference is the `dall_e` package itself (test extra `dall-e==0.1`, plus `attrs`, which it imports without
declaring), with seeded random weights at a small width so that the whole file runs in seconds; the default
architecture is checked tensor by tensor against the official default on the meta device.
"""
import copy
import dataclasses
import hashlib
import json
import os
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F

from beit_scale.checks import validate
from beit_scale.checkpoint.dall_e_pickle import RestrictedUnpickler, UnsafePickleError
from beit_scale.checkpoint.tokenizer_file import DALL_E_FORMAT, load_tokenizer, read_tokenizer_arch
from beit_scale.cli import main
from beit_scale.config import load_config
from beit_scale.tokenizers import DallEArch, DallEEncoder, VisualTokenizer
from beit_scale.tokenizers.dall_e import official_name
from beit_scale.tokenizers.labeler import Labeler, split_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)  # the official validators' minimum width and vocabulary


def _dall_e():
    return pytest.importorskip("dall_e", reason="the test extra: pip install -e '.[test]' (dall-e==0.1 and attrs)")


@pytest.fixture(scope="module")
def official():
    """The `dall_e` package's Encoder with seeded random weights."""
    torch.manual_seed(0)
    return _dall_e().Encoder(**SMALL).eval()


@pytest.fixture(scope="module")
def saved(official, tmp_path_factory):
    """The encoder saved as OpenAI saved encoder.pkl (torch.save of the whole module): both torch formats, and
    with half-precision weights (``half``; its reference is ``official`` rounded to half)."""
    folder = tmp_path_factory.mktemp("dall_e")
    paths = {"zip": folder / "encoder.pkl", "legacy": folder / "encoder_legacy.pkl", "half": folder / "half.pkl"}
    torch.save(official, paths["zip"])
    torch.save(official, paths["legacy"], _use_new_zipfile_serialization=False)
    torch.save(copy.deepcopy(official).half(), paths["half"])
    return paths


def _real_images(size: int) -> torch.Tensor:
    """``(4, 3, size, size)`` in ``[0, 1]``: two photos (scikit-learn's samples) and two Fashion-MNIST items."""
    from sklearn.datasets import load_sample_images

    from beit_scale.data.fashion_mnist import DEFAULT_SOURCE_DIR, has_fashion_mnist, read_idx_images

    crops = [torch.from_numpy(img[:, 100:527].copy()) for img in load_sample_images().images]  # (427, 427, 3) each
    photos = torch.stack(crops).permute(0, 3, 1, 2).float() / 255  # (2, 3, 427, 427)
    if has_fashion_mnist(DEFAULT_SOURCE_DIR):
        items = read_idx_images(DEFAULT_SOURCE_DIR / "t10k-images-idx3-ubyte.gz", limit=2)
        items = torch.from_numpy(items.copy()).float().div(255)[:, None].expand(-1, 3, -1, -1)  # (2, 3, 28, 28)
    else:  # no Debian package: two more crops of the photos
        items = photos[:, :, :200, :200]
    resized = [F.interpolate(x, size=(size, size), mode="bilinear", antialias=True) for x in (photos, items)]
    return torch.cat(resized).clamp(0, 1)


def _official_ids(official, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return official(_dall_e().map_pixels(images)).argmax(1).flatten(1)  # (B, h * w)


def _convert(source, out, *extra) -> int:
    return main(["convert-tokenizer", "dall-e", str(source), str(out), *extra])


def test_the_default_architecture_holds_the_official_encoders_tensors():
    with torch.device("meta"):
        theirs = {k: v.shape for k, v in _dall_e().Encoder(device=torch.device("meta")).state_dict().items()}
        ours = DallEEncoder(DallEArch()).state_dict()
    assert {official_name(k): v.shape for k, v in ours.items()} == theirs
    arch = DallEArch()
    assert (arch.vocab_size, arch.hidden_dim, arch.num_blocks_per_group, arch.input_size, arch.grid_size) == (
        8192, 256, 2, 112, 14)
    assert DallEArch(input_size=128).grid_size == 16


@pytest.mark.parametrize("fmt, size", [("zip", 112), ("zip", 128), ("legacy", 112), ("half", 112)])
def test_converted_encoder_gives_the_official_ids_on_real_images(official, saved, tmp_path, fmt, size):
    out = tmp_path / "dall_e.safetensors"
    extra = ["--input-size", str(size)] if size != 112 else []
    assert _convert(saved[fmt], out, "--trust-pickle", *extra) == 0

    arch = read_tokenizer_arch(out)
    assert arch == DallEArch(vocab_size=512, input_size=size, hidden_dim=64, num_blocks_per_group=1)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == DALL_E_FORMAT and json.loads(meta["arch"]) == dataclasses.asdict(arch)
    assert meta["source_sha256"] == hashlib.sha256(saved[fmt].read_bytes()).hexdigest()

    ours = load_tokenizer(out)
    assert isinstance(ours, VisualTokenizer) and (ours.input_size, ours.grid_size) == (size, size // 8)
    images = _real_images(size)
    reference = copy.deepcopy(official).half().float() if fmt == "half" else official
    expected = _official_ids(reference, images)
    ids = ours.encode(ours.map_pixels(images))
    assert ids.dtype == torch.int64 and ids.shape == (4, (size // 8) ** 2)
    assert torch.equal(ids, expected)
    assert len(set(expected.flatten().tolist())) > 3  # real content, not one token everywhere
    labeler = Labeler(ours, "fp32")
    assert torch.equal(labeler.encode(labeler.map_pixels(images)), expected)


def test_the_labeler_splits_after_the_last_max_pool(official, saved, tmp_path):
    out = tmp_path / "dall_e.safetensors"
    assert _convert(saved["zip"], out, "--trust-pickle") == 0
    ours = load_tokenizer(out)
    trunk, bottom = split_encoder(ours.encoder)
    assert isinstance(bottom[0], torch.nn.MaxPool2d) and not any(isinstance(m, torch.nn.MaxPool2d) for m in bottom[1:])
    views = ours.map_pixels(_real_images(112))
    with torch.no_grad():
        assert torch.equal(bottom(trunk(views)), ours.encoder(views))
    fp16 = Labeler(ours, "fp16")
    assert fp16.agreement(views) > 0.5 and int(fp16.nonfinite) == 0  # random weights: many near ties


class _Planted:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _planted(tmp_path, obj, name="planted.pkl", raw=False):
    path = tmp_path / name
    if raw:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path)
    return path


def test_without_trust_pickle_nothing_is_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"
    planted = _planted(tmp_path, {"encoder": _Planted(marker)})
    assert _convert(planted, tmp_path / "out.safetensors") == 2
    assert "Pass --trust-pickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    pickle.loads(pickle.dumps(_Planted(marker)))  # the plant is live: an ordinary unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize("raw", [False, True], ids=["torch.save", "plain pickle"])
def test_a_pickle_calling_os_system_is_refused_even_when_trusted(tmp_path, capsys, raw):
    marker = tmp_path / "pwned"
    planted = _planted(tmp_path, {"encoder": _Planted(marker)}, raw=raw)
    assert _convert(planted, tmp_path / "out.safetensors", "--trust-pickle") == 2
    err = capsys.readouterr().err
    assert f"asks for {os.system.__module__}.system" in err and "refused" in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_a_harmless_class_outside_the_allowlist_is_refused_by_name(tmp_path, official):
    import collections

    planted = _planted(tmp_path, {"blocks": official, "counts": collections.Counter("dall-e")})
    with pytest.raises(UnsafePickleError, match=r"asks for collections\.Counter"):
        with open(_planted(tmp_path, collections.Counter("x"), "c.pkl", raw=True), "rb") as f:
            RestrictedUnpickler(f).load()
    from beit_scale.checkpoint.tokenizer_file import convert_dall_e

    with pytest.raises(UnsafePickleError, match=r"planted\.pkl: the pickle asks for collections\.Counter"):
        convert_dall_e(planted, tmp_path / "out.safetensors", trust_pickle=True)


def test_a_file_that_is_not_an_encoder_is_refused(tmp_path, official):
    from beit_scale.checkpoint.tokenizer_file import convert_dall_e

    weights = _planted(tmp_path, {"w": torch.zeros(2)}, "state_dict.pt")
    with pytest.raises(ValueError, match=r"holds a dict, not a dall_e\.encoder\.Encoder"):
        convert_dall_e(weights, tmp_path / "out.safetensors", trust_pickle=True)
    edited = copy.deepcopy(official)
    edited.n_hid = 128  # the recorded width no longer matches the tensors
    with pytest.raises(ValueError, match=r"blocks\.input\.w has shape \(64, 3, 7, 7\), expected \(128, 3, 7, 7\)"):
        convert_dall_e(_planted(tmp_path, edited, "edited.pkl"), tmp_path / "out.safetensors", trust_pickle=True)
    script = tmp_path / "script.pt"  # the layout of a TorchScript archive, which torch.load hands to torch.jit.load
    with zipfile.ZipFile(script, "w") as archive:
        for name in ("archive/data.pkl", "archive/constants.pkl", "archive/code/__torch__.py"):
            archive.writestr(name, b"")
    with pytest.raises(UnsafePickleError, match=r"is a TorchScript archive"):
        convert_dall_e(script, tmp_path / "out.safetensors", trust_pickle=True)


def test_an_input_size_off_the_8_px_grid_is_refused_never_cropped(saved, tmp_path, capsys):
    assert _convert(saved["zip"], tmp_path / "out.safetensors", "--trust-pickle", "--input-size", "100") == 2
    err = capsys.readouterr().err
    assert "tokenizer.input_size=100 (convert-tokenizer --input-size) must be a positive multiple of 8" in err
    assert "never cropped; set it to 96 or 104" in err and not (tmp_path / "out.safetensors").exists()


def test_pretraining_validates_the_converted_grid_against_the_patch_grid(saved, tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    files = {}
    for size in (112, 128):
        files[size] = tmp_path / f"dall_e_{size}.safetensors"
        assert _convert(saved["zip"], files[size], "--trust-pickle", "--input-size", str(size)) == 0
    common = [f"data.root={tmp_path / 'train'}", "train.micro_batch=8", "train.global_batch=16"]
    for recipe in ("pretrain_base_in1k_dalle", "pretrain_large_in22k_dalle"):  # the large reads shards: a folder here
        validate(load_config(recipe, [*common, "data.format=folder", f"tokenizer.path={files[112]}"]), world_size=2)
    giant = [*common, "model.name=beit_giant_patch14_224", "masking.num_masked=102"]
    with pytest.raises(ValueError, match=r"16x16.*set tokenizer\.input_size=128 .*converted for a 112 px view.*"
                                         r"--input-size"):
        validate(load_config("pretrain_base_in1k_dalle", [*giant, f"tokenizer.path={files[112]}"]), world_size=2)
    validate(load_config("pretrain_base_in1k_dalle", [*giant, f"tokenizer.path={files[128]}"]), world_size=2)
