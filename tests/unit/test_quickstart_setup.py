"""Where the quickstart finds Fashion-MNIST, and the sizes it takes from its recipes."""
from __future__ import annotations

import gzip
import logging
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit_scale.config import load_config, load_quickstart
from beit_scale.data import FASHION_MNIST_CLASSES, export_fashion_mnist, find_fashion_mnist
from tests.distributed.ranks import ROOT, rank_env

NAMES = {"train": "train", "test": "t10k"}


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    """Fashion-MNIST's idx format: big-endian magic and sizes, then uint8 pixels / labels."""
    folder.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{NAMES[split]}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *images.shape) + images.tobytes())
    with opener(folder / f"{NAMES[split]}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def fake_dataset(folder: Path, gz: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    data = {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))
            for split, n in (("train", 12), ("test", 6))}
    for split, (images, labels) in data.items():
        write_idx(folder, split, images, labels, gz)
    return data


@pytest.mark.parametrize("layout", ["gz", "unzipped", "torchvision"])
def test_a_named_folder_is_used_in_each_layout_and_exports_its_exact_pixels(tmp_path, layout, caplog):
    named = tmp_path / "mine"
    files = named / "FashionMNIST" / "raw" if layout == "torchvision" else named
    data = fake_dataset(files, gz=layout != "unzipped")
    with caplog.at_level(logging.INFO):
        source = find_fashion_mnist(named, tmp_path / "download", debian_dir=tmp_path / "no-debian")
    assert source == named and f"the folder you named, {named}" in caplog.text
    split_dir = export_fashion_mnist(tmp_path / "out", "test", limit=6, source_dir=source)
    images, labels = data["test"]
    for i in range(6):
        png = split_dir / FASHION_MNIST_CLASSES[labels[i]] / f"{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(png)), images[i])


def test_a_named_folder_without_the_files_is_refused_naming_what_it_needs(tmp_path):
    fake_dataset(tmp_path / "half")
    (tmp_path / "half" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match=r"--data .*half does not hold Fashion-MNIST: it needs .*t10k-labels"):
        find_fashion_mnist(tmp_path / "half", tmp_path / "download")  # even with Debian's package present


def test_debian_package_is_the_default_then_an_earlier_download(tmp_path, caplog):
    fake_dataset(tmp_path / "debian")
    fake_dataset(tmp_path / "download" / "FashionMNIST" / "raw")
    with caplog.at_level(logging.INFO):
        assert find_fashion_mnist(None, tmp_path / "download", debian_dir=tmp_path / "debian") == tmp_path / "debian"
        assert "Debian's package" in caplog.text
        assert find_fashion_mnist(None, tmp_path / "download", debian_dir=tmp_path / "none") == tmp_path / "download"
        assert "an earlier download" in caplog.text


def test_nothing_found_tries_torchvision_and_says_what_to_do_when_it_fails(tmp_path, caplog):
    """Offline (as on CI) torchvision's download fails; with a network it must leave a usable folder."""
    download = tmp_path / "download"
    with caplog.at_level(logging.INFO):
        try:
            found = find_fashion_mnist(None, download, debian_dir=tmp_path / "none")
        except ValueError as err:
            message = str(err)
            assert "torchvision could not download it" in message
            assert "--data FOLDER" in message and "apt-get install dataset-fashion-mnist" in message
            assert "t10k-images-idx3-ubyte.gz" in message
        else:
            assert found == download and "downloaded by torchvision" in caplog.text
            assert export_fashion_mnist(tmp_path / "out", "test", limit=3, source_dir=found).is_dir()
    assert "downloading it with torchvision" in caplog.text


def test_a_damaged_idx_file_is_a_message_naming_it(tmp_path):
    fake_dataset(tmp_path / "bad")
    (tmp_path / "bad" / "t10k-images-idx3-ubyte.gz").write_text("<html>not found</html>")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz cannot be read as an idx file"):
        export_fashion_mnist(tmp_path / "out", "test", limit=3, source_dir=tmp_path / "bad")


def test_quickstart_sizes_come_from_its_recipes_and_are_checked():
    default, small = load_quickstart("default"), load_quickstart("small")
    assert (default.train_images, default.heldout_images) == (12000, 1024)
    assert small.train_images < default.train_images
    for qs in (default, small):  # each names a tokenizer and a pretraining recipe of the right job
        assert load_config(qs.tokenizer).run.job == "tokenizer" and load_config(qs.pretrain).run.job == "pretrain"
    assert load_config(small.pretrain).train.total_steps < load_config(default.pretrain).train.total_steps
    assert load_quickstart("small", ["train_images=500"]).train_images == 500
    with pytest.raises(ValueError, match="train_images=0 must be in"):
        load_quickstart("default", ["train_images=0"])
    with pytest.raises(ValueError, match="unknown config key train_image; did you mean train_images"):
        load_quickstart("default", ["train_image=5"])


def test_quickstart_refuses_a_stage_recipe_of_another_job(tmp_path):
    from beit_scale.train import quickstart

    recipe = tmp_path / "qs.yaml"
    recipe.write_text("base: default\ntokenizer: quickstart_pretrain\n")
    with pytest.raises(ValueError, match="quickstart_pretrain' has run.job='pretrain'; it must be a tokenizer recipe"):
        quickstart.run(str(recipe), str(tmp_path / "out"))


def test_quickstart_help_states_the_recipes_defaults():
    help_text = subprocess.run([sys.executable, "-m", "beit_scale.cli", "quickstart", "--help"], cwd=ROOT,
                               env=rank_env(), capture_output=True, text=True, check=True, timeout=120).stdout
    help_text = " ".join(help_text.split())
    for name in ("default", "small"):
        qs = load_quickstart(name)
        tok, pt = load_config(qs.tokenizer), load_config(qs.pretrain)
        assert (f"recipe '{name}': {qs.train_images} training and {qs.heldout_images} held-out Fashion-MNIST images; "
                f"tokenizer {qs.tokenizer} ({tok.train.total_steps} steps of {tok.train.global_batch}), "
                f"pretraining {qs.pretrain} ({pt.train.total_steps} steps of {pt.train.global_batch})") in help_text
    assert "--data DIR" in help_text
