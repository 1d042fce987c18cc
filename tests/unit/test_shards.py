"""Tar shards (`beit-scale shard`, `ShardDataset`) on real Fashion-MNIST images: what they hold, how a killed
conversion resumes, how damage is refused or skipped, and that training reads the same samples as from the folder."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from beit_scale.config import DataConfig, load_config
from beit_scale.data import MIMDataset, SafeImageFolder, ShardDataset, TwoViewTransform, export_fashion_mnist
from beit_scale.data import open_images, write_shards
from beit_scale.data import shard_writer
from beit_scale.data.shards import INDEX, INDEX_DTYPE, MANIFEST, iter_members, read_manifest
from beit_scale.masking import build_mask_generator

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                reason="apt-get install dataset-fashion-mnist")
SIZE_MB = 0.05  # about 20 Fashion-MNIST images (2.5 KB of tar each) per shard: 12 shards of 240 images
SHARDS = DataConfig(format="shards")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return export_fashion_mnist(tmp_path_factory.mktemp("fmnist"), "train", limit=240)


@pytest.fixture(scope="module")
def shards(folder, shards_of):
    """(OUT of `beit-scale shard` over the folder with 2 workers, its manifest)."""
    out = shards_of(folder, SIZE_MB)
    return out, json.loads((out / MANIFEST).read_text())


def _pixels(sample) -> tuple[bytes, int]:
    img, label = sample
    return np.asarray(img).tobytes(), label


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sidecar_columns(out: Path, shard: int) -> dict:
    """The per-sample columns the writer keeps in ``shard-NNNNNN.json`` (key, ext, label, offset, size, source)."""
    return json.loads((out / f"shard-{shard:06d}.json").read_text())["shard"]["samples"]


def _small_folder(folder: Path, root: Path, per_class: int = 6) -> Path:
    """Two classes of real images copied from the export."""
    for name in ("coat", "sneaker"):
        (root / name).mkdir(parents=True)
        for f in sorted((folder / name).glob("*.png"))[:per_class]:
            shutil.copy(f, root / name / f.name)
    return root


# ---------------------------------------------------------------- what the shards hold


def test_shards_hold_every_image_once_with_its_label_and_original_bytes(folder, shards):
    out, manifest = shards
    listing = SafeImageFolder(folder)
    assert manifest["classes"] == listing.classes and manifest["num_samples"] == len(listing) == 240
    assert len(manifest["shards"]) >= 8 and manifest["corrupt"] == []
    # The manifest holds no per-sample data; the index is one binary row per sample, described by the manifest.
    assert all(set(shard) == {"name", "num_samples", "size", "sha256"} for shard in manifest["shards"])
    assert manifest["index"] == {"name": INDEX, "num_samples": 240, "size": (out / INDEX).stat().st_size,
                                 "sha256": shard_writer.sha256(out / INDEX), "exts": ["png"], "key_digits": 9}
    index = np.load(out / INDEX)
    assert index.dtype == INDEX_DTYPE and index.shape == (240,)
    seen, start = [], 0
    for i, shard in enumerate(manifest["shards"]):
        path, cols = out / shard["name"], _sidecar_columns(out, i)
        rows = index[start:start + shard["num_samples"]]
        start += shard["num_samples"]
        assert rows["offset"].tolist() == cols["offset"] and rows["size"].tolist() == cols["size"]
        assert rows["label"].tolist() == cols["label"] and [f"{k:09d}" for k in rows["key"]] == cols["key"]
        assert path.stat().st_size == shard["size"] and shard_writer.sha256(path) == shard["sha256"]
        members = dict(iter_members(path))  # the WebDataset view: {key}.png and {key}.cls
        assert len(members) == 2 * shard["num_samples"]
        with open(path, "rb") as f:
            for key, ext, source, (offset, size, _, label, _) in zip(cols["key"], cols["ext"], cols["source"], rows):
                original = (folder / source).read_bytes()
                assert members[f"{key}.{ext}"] == original  # not re-encoded
                assert members[f"{key}.cls"] == str(label).encode()
                f.seek(offset)
                assert f.read(size) == original  # one seek + read, as ShardDataset does
                seen.append((str(folder / source), int(label)))
    assert seen == listing.samples  # each image once, in the folder's order, with its label


def test_shard_dataset_returns_what_the_folder_returns_sample_for_sample(folder, shards):
    images, ds = SafeImageFolder(folder), ShardDataset(shards[0])
    assert (ds.classes, ds.class_to_idx, ds.targets) == (images.classes, images.class_to_idx, images.targets)
    assert [t for _, t in ds.samples] == images.targets and ds.samples[0][0].endswith("shard-000000.tar/000000000.png")
    assert all(_pixels(ds[i]) == _pixels(images[i]) for i in range(len(images)))
    assert ds[-1][0].mode == "RGB" and ds[-1][0].size == (28, 28)
    with pytest.raises(IndexError):
        ds[240]


def test_open_images_with_format_shards_feeds_mim_the_same_views_also_in_forked_workers(folder, shards, one_thread):
    transform = TwoViewTransform(16, 8, color_jitter=0.4)
    masks = build_mask_generator("blockwise", (4, 4), 6, min_block_patches=2)
    by_folder = MIMDataset(open_images(DataConfig(), str(folder)), transform, masks, seed=3)
    by_shards = MIMDataset(open_images(SHARDS, str(shards[0])), transform, masks, seed=3)
    assert isinstance(by_shards.base, ShardDataset) and isinstance(by_folder.base, SafeImageFolder)
    by_shards[0]  # the parent opens a shard before the workers fork: they must not share its descriptor
    indices = [0, 23, 24, 101, 239]
    for epoch in (0, 1):
        by_folder.set_epoch(epoch)
        by_shards.set_epoch(epoch)
        loaded = next(iter(DataLoader(torch.utils.data.Subset(by_shards, indices), batch_size=5, num_workers=2)))
        for j, i in enumerate(indices):
            a, b = by_folder[i], by_shards[i]
            for name in ("image", "tokenizer_view", "mask"):
                assert torch.equal(a[name], b[name]) and torch.equal(a[name], loaded[name][j]), (epoch, i, name)
            assert a["label"] == b["label"] == loaded["label"][j]


# ---------------------------------------------------------------- conversion: corrupt sources, resume, refusals


def test_a_corrupt_source_image_is_left_out_and_listed_with_its_reason(folder, tmp_path, caplog):
    src = _small_folder(folder, tmp_path / "src")
    png = (src / "coat" / sorted(os.listdir(src / "coat"))[1]).read_bytes()
    (src / "coat" / "99990.png").write_bytes(png[: len(png) // 2])  # truncated
    (src / "sneaker" / "99991.jpg").write_bytes(b"not an image" * 20)
    (src / "sneaker" / "99992.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="beit_scale.data.shard_writer"):
        manifest = write_shards(src, tmp_path / "out", 0.01, workers=2)
    reasons = {bad["source"]: bad["reason"] for bad in manifest["corrupt"]}
    assert set(reasons) == {"coat/99990.png", "sneaker/99991.jpg", "sneaker/99992.png"}
    assert reasons["coat/99990.png"].startswith("OSError: ")
    assert reasons["sneaker/99992.png"].startswith("UnidentifiedImageError: ")
    assert f"left out unreadable image coat/99990.png ({reasons['coat/99990.png']})" in caplog.text
    ds, images = ShardDataset(tmp_path / "out"), SafeImageFolder(src)
    readable = [i for i, (p, _) in enumerate(images.samples) if Path(p).name[:4] != "9999"]
    assert manifest["num_samples"] == len(ds) == len(readable) == 12
    assert [_pixels(ds[j]) for j in range(len(ds))] == [_pixels(images[i]) for i in readable]


def _killed_conversion(src: Path, out: Path, after: int) -> None:
    """Convert with one process that dies (SIGKILL) while reading its ``after``-th image."""
    calls = [0]
    decode = shard_writer.decode_rgb

    def dying(data):
        calls[0] += 1
        if calls[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return decode(data)

    shard_writer.decode_rgb = dying  # in the child only
    write_shards(src, out, SIZE_MB, workers=1)


def test_a_killed_conversion_resumes_to_the_manifest_of_an_uninterrupted_run(folder, shards, tmp_path, caplog):
    full, manifest = shards
    out = tmp_path / "out"
    counts = [s["num_samples"] for s in manifest["shards"]]
    child = multiprocessing.get_context("fork").Process(target=_killed_conversion,
                                                        args=(folder, out, sum(counts[:3]) + 5))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    # Killed in the middle of shard 3: 0-2 complete with their index entries, 3 only under its temporary name.
    assert sorted(p.name for p in out.glob("shard-0*")) == [
        "shard-000000.json", "shard-000000.tar", "shard-000001.json", "shard-000001.tar", "shard-000002.json",
        "shard-000002.tar", "shard-000003.tar.tmp"]
    assert not (out / MANIFEST).exists() and not (out / INDEX).exists()
    kept = {n: os.stat(out / n) for n in ("shard-000000.tar", "shard-000002.tar")}
    damaged = bytearray((out / "shard-000001.tar").read_bytes())  # same size, one byte altered
    damaged[len(damaged) // 3] ^= 0xFF
    (out / "shard-000001.tar").write_bytes(bytes(damaged))
    with caplog.at_level(logging.INFO, logger="beit_scale.data.shard_writer"):
        resumed = write_shards(folder, out, SIZE_MB, workers=2)
    assert f"resuming: 2 of {len(counts)} shards are complete and verified (size, sha256)" in caplog.text
    assert "shard-000001.tar does not match its index entry shard-000001.json (size or sha256): writing it again" \
        in caplog.text
    assert resumed == manifest and json.loads((out / MANIFEST).read_text()) == manifest  # also: 1 worker vs 2
    assert all((out / s["name"]).read_bytes() == (full / s["name"]).read_bytes() for s in manifest["shards"])
    assert (out / INDEX).read_bytes() == (full / INDEX).read_bytes()
    for name, st in kept.items():  # kept, not rewritten
        assert (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not list(out.glob("*.tmp"))


def test_reruns_and_careless_commands_are_refused_or_change_nothing(folder, shards, tmp_path, capsys):
    from beit_scale.cli import main

    out, manifest = _copy(shards[0], tmp_path / "out"), shards[1]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0*")}
    assert write_shards(folder, out, SIZE_MB, workers=2) == manifest  # a finished run: verified, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0*")} == before
    with pytest.raises(ValueError, match=r"holds shards made from other settings or another SRC \(shard_size_mb: "
                                         r"0\.05 then, 0\.1 now\); resuming would mix them"):
        write_shards(folder, out, 0.1)
    other = _small_folder(folder, tmp_path / "other")
    with pytest.raises(ValueError, match=r"other settings or another SRC \(source: .*num_listed: 240 then, 12 now"):
        write_shards(other, out, SIZE_MB)
    with pytest.raises(ValueError, match=r"is not empty \(coat, .*\) and was not started by `beit-scale shard`"):
        write_shards(folder, other, SIZE_MB)
    with pytest.raises(ValueError, match="is inside SRC"):
        write_shards(other, other / "shards", SIZE_MB)
    assert not (other / "shards").exists()
    assert main(["shard", str(tmp_path / "typo"), str(tmp_path / "new")]) == 2
    assert "SRC" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["shard", str(other), str(tmp_path / "new"), "--shard-size", "0.01", "--workers", "1"]) == 0
    assert "manifest.json: 12 images of 2 classes in" in capsys.readouterr().out


def test_class_tars_and_file_lists_convert_like_a_folder(folder, tmp_path):
    src = _small_folder(folder, tmp_path / "src", per_class=3)
    tars = tmp_path / "winter21"
    tars.mkdir()
    for name in ("sneaker", "coat"):  # the 22k release: one tar of JPEGs per class, named by its synset
        with tarfile.open(tars / f"{name}.tar", "w") as tar:
            for f in sorted((src / name).iterdir(), reverse=True):
                tar.add(f, arcname=f"{name}_{f.name}")
            tar.addfile(tarfile.TarInfo("README"), None)
    listing = tmp_path / "list.tsv"
    listing.write_text("".join(f"src/{p.parent.name}/{p.name}\t{p.parent.name}\n" for p in sorted(src.glob("*/*"))))
    images = SafeImageFolder(src)
    for source in (tars, listing):
        write_shards(source, tmp_path / f"{source.stem}_shards", 0.01, workers=1)
        ds = ShardDataset(tmp_path / f"{source.stem}_shards")
        assert ds.classes == ["coat", "sneaker"]
        assert [_pixels(ds[i]) for i in range(len(ds))] == [_pixels(images[i]) for i in range(len(images))]
    (tmp_path / "bad.tsv").write_text("src/coat/x.png coat\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:1: 'src/coat/x\.png coat' must be `path<TAB>class_name`"):
        write_shards(tmp_path / "bad.tsv", tmp_path / "bad", 1)


# ---------------------------------------------------------------- damaged shards: skipped members, refused manifests


def test_a_corrupt_member_is_skipped_like_safe_image_folder_skips_a_file(shards, tmp_path, caplog):
    out, manifest = _copy(shards[0], tmp_path / "out"), shards[1]
    first = manifest["shards"][0]["num_samples"]  # global index of shard 1's first sample
    rows = np.load(out / INDEX)[first:]
    path = out / manifest["shards"][1]["name"]
    with open(path, "r+b") as f:  # members 1, 2 and 3 of shard 1 overwritten in place: same sizes
        for j in (1, 2, 3):
            f.seek(int(rows["offset"][j]))
            f.write(b"\0" * int(rows["size"][j]))
    clean = ShardDataset(shards[0])
    with caplog.at_level(logging.WARNING, logger="beit_scale.data.folder"):
        ds = ShardDataset(out)  # sizes match: accepted without verify=True
        for _ in range(2):
            for i in (first + 1, first + 2, first + 3):  # each replaced by the next readable index, with its label
                assert _pixels(ds[i]) == _pixels(clean[first + 4])
    names = {f"{path}/{_sidecar_columns(out, 1)['key'][j]}.png" for j in (1, 2, 3)}
    assert ds.bad_paths == names
    assert all(caplog.text.count(f"skipping unreadable image {n} (UnidentifiedImageError") == 1 for n in names)
    with pytest.raises(RuntimeError, match=r"3 consecutive images from index .* \(max_consecutive_failures=2\)"):
        ShardDataset(out, max_consecutive_failures=2)[first + 1]
    with pytest.raises(ValueError, match=r"shard-000001\.tar: sha256 differs from the manifest \(altered\)"):
        ShardDataset(out, verify=True)


def test_a_truncated_missing_or_miscounted_shard_is_refused_before_training(shards, tmp_path, tiny_tokenizer_file):
    from beit_scale.checks import validate

    out, manifest = _copy(shards[0], tmp_path / "out"), shards[1]
    ShardDataset(out, verify=True)
    data = (out / "shard-000004.tar").read_bytes()
    (out / "shard-000004.tar").write_bytes(data[:-10240])  # cut at a tar record: still a valid-looking tar
    with pytest.raises(ValueError, match=r"shard-000004\.tar is \d+ bytes, the manifest says \d+ \(truncated\)\. "
                                         r"Rerun `beit-scale shard .* .*out` to rewrite the damaged shards"):
        open_images(SHARDS, str(out))
    (out / "shard-000004.tar").unlink()
    with pytest.raises(ValueError, match=r"shard-000004\.tar is missing"):
        ShardDataset(out)
    shutil.copy(shards[0] / "shard-000004.tar", out)
    edited = dict(manifest, num_samples=manifest["num_samples"] + 1)
    (out / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"the shards hold 240 samples, the manifest's num_samples says 241"):
        ShardDataset(out)
    (out / MANIFEST).unlink()  # an unfinished conversion
    with pytest.raises(ValueError, match=r"holds no manifest\.json, so it is not a finished shards folder"):
        ShardDataset(out)
    # The recipe checks: the format and the folder must agree, and classes come from the manifest.
    tok = tiny_tokenizer_file(112, 8)

    def pretrain(root, fmt):
        return load_config("pretrain_base_in1k", [f"data.root={root}", f"tokenizer.path={tok}", f"data.format={fmt}",
                                                  "train.micro_batch=8", "train.global_batch=16"])
    validate(pretrain(shards[0], "shards"), world_size=2)
    with pytest.raises(ValueError, match=r"holds no manifest\.json; with data\.format=shards it must be the OUT"):
        validate(pretrain(out, "shards"), world_size=2)
    with pytest.raises(ValueError, match=r"holds tar shards \(manifest\.json\); set data\.format=shards"):
        validate(pretrain(shards[0], "folder"), world_size=2)
    with pytest.raises(ValueError, match=r"data\.format='tar' must be one of 'folder', 'shards'"):
        pretrain(shards[0], "tar")
    finetune = load_config("finetune_quickstart", [f"data.root={shards[0]}", "data.format=shards",
                                                   "finetune.init_from=", "finetune.num_classes=3",
                                                   "train.micro_batch=8", "train.global_batch=16"])
    with pytest.raises(ValueError, match=r"finetune\.num_classes=3 but data\.root=.* has 10 class"):
        validate(finetune, world_size=2)


def test_the_index_is_memory_mapped_and_a_truncated_or_damaged_one_is_refused(shards, tmp_path):
    out, manifest = _copy(shards[0], tmp_path / "out"), shards[1]
    ds = ShardDataset(out)
    assert isinstance(ds._index, np.memmap) and Path(ds._index.filename) == out / INDEX  # shared page cache
    clone = pickle.loads(pickle.dumps(ds))  # as to a spawned loader worker: mapped again, not copied
    assert isinstance(clone._index, np.memmap) and _pixels(clone[17]) == _pixels(ds[17])
    assert ds.__getstate__()["_index"] is None
    data = (out / INDEX).read_bytes()
    rerun = r"\. Rerun `beit-scale shard .* .*out` to rewrite the damaged shards"
    (out / INDEX).write_bytes(data[:-INDEX_DTYPE.itemsize])  # the last row cut off
    with pytest.raises(ValueError, match=r"index\.npy is \d+ bytes, the manifest says \d+ \(truncated\)" + rerun):
        ShardDataset(out)
    (out / INDEX).write_bytes(b"\0" * len(data))  # same size, header gone
    with pytest.raises(ValueError, match=r"index\.npy does not start with the \.npy header \(overwritten\)"):
        ShardDataset(out)
    (out / INDEX).write_bytes(data[:8] + b"\0" * (len(data) - 8))  # same size, header damaged after the magic
    with pytest.raises(ValueError, match=r"index\.npy is not a readable index \(ValueError: "):
        ShardDataset(out)
    damaged = bytearray(data)
    damaged[-INDEX_DTYPE.itemsize] ^= 0xFF  # the last row's offset altered, same size: found by verify=True
    (out / INDEX).write_bytes(bytes(damaged))
    assert len(ShardDataset(out)) == 240
    with pytest.raises(ValueError, match=r"index\.npy: sha256 differs from the manifest \(altered\)" + rerun):
        ShardDataset(out, verify=True)
    # A consistent manifest over wrong rows (an edited index and manifest): the rows are checked with verify=True.
    rows = np.load(out / INDEX)
    rows["offset"][-1] = manifest["shards"][-1]["size"]
    np.save(out / INDEX, rows)
    index = dict(manifest["index"], sha256=shard_writer.sha256(out / INDEX))
    (out / MANIFEST).write_text(json.dumps(dict(manifest, index=index)))
    with pytest.raises(ValueError, match=r"index\.npy: 1 rows lie outside their shard, the classes or the "
                                         r"extensions, the first at sample 239"):
        ShardDataset(out, verify=True)
    np.save(out / INDEX, rows[:-1])  # another length
    index = dict(manifest["index"], size=(out / INDEX).stat().st_size)
    (out / MANIFEST).write_text(json.dumps(dict(manifest, index=index)))
    with pytest.raises(ValueError, match=r"index\.npy holds 239 samples, the manifest says 240 \(index\)"):
        ShardDataset(out)
    (out / INDEX).unlink()
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"index\.npy is missing" + rerun):
        ShardDataset(out)


def test_a_v1_folder_is_refused_with_the_command_that_upgrades_it_in_place(folder, shards, tmp_path):
    out, manifest = _copy(shards[0], tmp_path / "out"), shards[1]
    (out / INDEX).unlink()  # v1: no index, the per-sample columns inside manifest.json
    v1 = {k: v for k, v in manifest.items() if k != "index"}
    v1["shards"] = [dict(s, samples=_sidecar_columns(out, i)) for i, s in enumerate(manifest["shards"])]
    (out / MANIFEST).write_text(json.dumps(dict(v1, format="beit_scale.shards.v1")))
    upgrade = r"is a beit_scale\.shards\.v1 manifest .*; rerun `beit-scale shard .* .*out` to upgrade it in place"
    with pytest.raises(ValueError, match=upgrade):
        ShardDataset(out)
    with pytest.raises(ValueError, match=upgrade):
        read_manifest(out)  # what the config check reads for the class list
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0*")}
    assert write_shards(folder, out, SIZE_MB, workers=1) == manifest  # the shards and their entries are v1's
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0*")} == before
    assert (out / INDEX).read_bytes() == (shards[0] / INDEX).read_bytes() and len(ShardDataset(out)) == 240


def test_the_22k_recipes_read_tar_shards():
    for recipe in ("pretrain_large_in22k", "pretrain_giant_in22k", "finetune_base_pt22k_ft22k",
                   "finetune_large_pt22k_ft22k", "finetune_giant_pt22k_ft22k"):
        assert load_config(recipe).data.format == "shards", recipe
