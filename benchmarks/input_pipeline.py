"""Images/s per core of the two-view input pipeline, JPEG decode included: the reference, today's transform, ours.

Three pipelines and two baselines on the same 500x375 JPEGs (crops of real photos, the anchor's `sample_jpegs`),
one process with one torch thread, measured in turns (each round runs every one, so load hits them alike):

- ``reference``: the anchor's unilm-style code (``../shared/bench/pipeline_anchor.py``, imported when present,
  else the copy in this file: see ``anchor_source`` in the result): decode, jitter the whole image, crop, resize.
- ``today``: the dataset's decode (``SafeImageFolder`` / the shard reader), then `TwoViewTransform`.
- ``fast``: what a loader worker does with ``data.transform: fast`` (the default): the dataset's array decode
  (``arrays=True``: libjpeg-turbo straight into an array), then `FastTwoViewTransform` with ``defer``: the views
  leave as uint8 with their colour plan, which the training step applies on the device (`finish_batch`).
- ``decode``: the dataset's PIL decode alone; ``decode_array``: its array decode alone.
- ``floor``: the array decode, the reference's draws, the crop and one resize to the 224 px view in uint8
  (`floor_views`): the least any transform with the reference's semantics does, so ``floor_over_reference``
  bounds ``fast``'s ratio.
- ``finish_cpu``: images/s of `FastTwoViewTransform.finish` on batches of 64 on this CPU (one thread): the part of
  ``fast`` that runs on the training device, here as a CPU-only run would pay it in its main process.

Each from an image folder and from a tar shard: `beit_scale.data.shards.ShardDataset` over shards that
``write_shards`` made of that folder when the module has them, else a plain tar read by offset (``shard_source``
says which). The reference decodes for itself: the file's bytes, or one positional read in a plain tar of the JPEGs.

Per core: images per CPU second of this process (``img_s_cpu``, robust to other processes' load on the
scheduler, not to their use of the shared caches) and per wall second (``img_s_wall``); median, min and max over
the rounds, and the ratio fast / reference of each round.

    python benchmarks/input_pipeline.py            # about 3 minutes
    python benchmarks/input_pipeline.py --smoke    # a few seconds (CI)

Results go to ``benchmarks/results/input_pipeline_cpu.json`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import ColorJitter, RandomResizedCrop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ANCHOR = ROOT.parent / "shared" / "bench" / "pipeline_anchor.py"
TARGET_IMG_S, TARGET_RATIO = 400, 2.9  # issue 13: per core, and x the reference in the same process
FINISH_BATCH = 64  # deferred samples finished per call in the finish_cpu measurement

from benchmarks.quickstart import cpu_model  # noqa: E402  (the same machine record as the quickstart's)
from beit_scale.data.fast_views import FastTwoViewTransform  # noqa: E402
from beit_scale.data.folder import SafeImageFolder, decode_rgb_array  # noqa: E402
from beit_scale.data.transforms import TwoViewTransform  # noqa: E402


# ------------------------------------------------------------------ the reference (the anchor's code, copied)
def _copy_sample_jpegs(n: int = 64) -> list[bytes]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise SystemExit("benchmarks/input_pipeline.py needs scikit-learn (its sample photos): pip install '.[test]'"
                         ) from e
    imgs = load_sample_images().images
    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        a = imgs[i % len(imgs)]
        y, x = rng.integers(0, 40), rng.integers(0, 100)
        crop = Image.fromarray(a[y:y + 375, x:x + 500])
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _copy_two_view() -> Callable[[bytes], tuple]:
    from torchvision import transforms as T

    common = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip(),
                        T.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC)])
    patch = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def tok_view(img):
        t = T.functional.to_tensor(img.resize((112, 112), Image.LANCZOS))
        return (1 - 2 * 0.1) * t + 0.1  # DALL-E map_pixels

    def two_view(data: bytes):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        v = common(img)
        return patch(v), tok_view(v)

    return two_view


def load_anchor() -> tuple[Callable[[int], list[bytes]], Callable[[bytes], tuple], str]:
    """(sample_jpegs, two_view, where they came from): the anchor file when present, else the copies above."""
    if ANCHOR.is_file():
        spec = importlib.util.spec_from_file_location("pipeline_anchor", ANCHOR)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.sample_jpegs, mod.two_view, f"imported {ANCHOR.relative_to(ROOT.parent)}"
    return _copy_sample_jpegs, _copy_two_view(), "in-file copy (benchmarks/input_pipeline.py): no anchor file"


# ------------------------------------------------------------------ the floor under any transform of these semantics
_JITTER = ColorJitter(0.4, 0.4, 0.4)


def floor_views(pixels: np.ndarray) -> Tensor:
    """What every two-view transform with the reference's semantics does at least: the reference's draws (jitter,
    flip, box), the crop and one resize to the 224 px patch view, in uint8: no jitter, normalisation or second
    view. Its speed bounds what any such transform can reach with the dataset's fastest decode."""
    ColorJitter.get_params(_JITTER.brightness, _JITTER.contrast, _JITTER.saturation, None)
    torch.rand(1).item()
    size_only = torch.empty((), dtype=torch.uint8).expand(3, *pixels.shape[:2])
    top, left, height, width = RandomResizedCrop.get_params(size_only, [0.08, 1.0], [3 / 4, 4 / 3])
    crop = pixels[top:top + height, left:left + width].copy()
    return F.interpolate(torch.from_numpy(crop).permute(2, 0, 1)[None], (224, 224), mode="bicubic", antialias=True)


# ------------------------------------------------------------------ sources: a folder and a shard
class Source:
    """Images by index: ``raw(i)`` the file's bytes (for the reference), ``image(i)`` the dataset's decoded RGB,
    ``array(i)`` its (H, W, 3) uint8 array decode."""

    def __init__(self, raw: Callable[[int], bytes], image: Callable[[int], Image.Image],
                 array: Callable[[int], np.ndarray], n: int):
        self.raw, self.image, self.array, self.n = raw, image, array, n


def folder_source(jpegs: list[bytes], root: Path) -> Source:
    cls = root / "photos"
    cls.mkdir(parents=True)
    paths = []
    for i, data in enumerate(jpegs):
        paths.append(cls / f"{i:05d}.jpg")
        paths[-1].write_bytes(data)
    dataset, arrays = SafeImageFolder(str(root)), SafeImageFolder(str(root), arrays=True)
    return Source(lambda i: paths[i].read_bytes(), lambda i: dataset[i][0], lambda i: arrays[i][0], len(paths))


def _plain_tar(jpegs: list[bytes], path: Path) -> list[tuple[int, int]]:
    """The JPEGs as members of one tar; (offset, size) of each one's bytes."""
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(jpegs):
            info = tarfile.TarInfo(f"{i:05d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [(m.offset_data, m.size) for m in tar.getmembers()]


def shard_source(jpegs: list[bytes], folder: Path, root: Path) -> tuple[Source, str]:
    """The shard reader over shards of ``folder`` when beit_scale has one, else a plain tar read by offset."""
    index = _plain_tar(jpegs, root / "plain.tar")
    fd = os.open(root / "plain.tar", os.O_RDONLY)

    def raw(i: int) -> bytes:
        offset, size = index[i]
        return os.pread(fd, size, offset)

    try:
        from beit_scale.data.shard_writer import write_shards
        from beit_scale.data.shards import ShardDataset

        write_shards(folder, root / "shards", workers=1)
        dataset, arrays = ShardDataset(root / "shards"), ShardDataset(root / "shards", arrays=True)
        if len(dataset) != len(jpegs):
            raise RuntimeError(f"{len(dataset)} samples in the shards, {len(jpegs)} images in the folder")
        return (Source(raw, lambda i: dataset[i][0], lambda i: arrays[i][0], len(jpegs)),
                "beit_scale.data.shards.ShardDataset")
    except Exception as e:  # noqa: BLE001 - the shard reader is optional here; say why it was not used
        from beit_scale.data.folder import decode_rgb

        why = f"{type(e).__name__}: {e}"
        return (Source(raw, lambda i: decode_rgb(raw(i)), lambda i: decode_rgb_array(raw(i)), len(jpegs)),
                f"plain tar read by offset ({why})")


# ------------------------------------------------------------------ timing
def measure(fn: Callable[[int], object], n: int, seconds: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) of ``fn`` over indices 0, 1, ... mod n."""
    wall, cpu, i = time.perf_counter(), time.process_time(), 0
    while True:
        fn(i % n)
        i += 1
        if i % 4 == 0 and time.perf_counter() - wall >= seconds:
            break
    return i / (time.perf_counter() - wall), i / (time.process_time() - cpu)


def spread(values: list[float], digits: int = 1) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def machine() -> dict:
    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("torch", "torchvision", "pillow", "numpy")}
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_avg_1m_before": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), **versions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="turns over every pipeline (default 5)")
    p.add_argument("--seconds", type=float, default=3.0, help="per pipeline per round (default 3)")
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs, cycled (default 64)")
    p.add_argument("--smoke", action="store_true", help="8 images, 1 round of 0.1 s: proves the script runs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "input_pipeline_cpu.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.seconds, args.images = 1, 0.1, 8
    torch.set_num_threads(1)
    info = machine()
    sample_jpegs, anchor_two_view, anchor_source = load_anchor()
    jpegs = sample_jpegs(args.images)
    # the anchor's settings: 224 px patch view, 112 px tokenizer view in DALL-E's pixel map
    transforms = {"today": TwoViewTransform(224, 112, tokenizer_pixel_map=lambda x: 0.8 * x + 0.1),
                  "fast": FastTwoViewTransform(224, 112, defer=True, tokenizer_pixel_map=lambda x: 0.8 * x + 0.1)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder_source(jpegs, Path(tmp) / "folder")
        shard, shard_from = shard_source(jpegs, Path(tmp) / "folder", Path(tmp))
        sources = {"folder": folder, "shards": shard}
        pipelines = {}
        for name, src in sources.items():
            pipelines[name] = {
                "decode": src.image,
                "decode_array": src.array,
                "reference": lambda i, src=src: anchor_two_view(src.raw(i)),
                "today": lambda i, src=src: transforms["today"](src.image(i)),
                "fast": lambda i, src=src: transforms["fast"](src.array(i)),
                "floor": lambda i, src=src: floor_views(src.array(i)),
            }
        for per_source in pipelines.values():  # warm-up: first calls, caches, the page cache
            for fn in per_source.values():
                for i in range(2 if args.smoke else args.images):
                    fn(i)
        runs = {s: {k: {"wall": [], "cpu": []} for k in fns} for s, fns in pipelines.items()}
        # the device's part of fast, on this CPU: finish a batch of 64 deferred samples (one call = 64 images)
        deferred = [transforms["fast"](folder.array(i % args.images)) for i in range(FINISH_BATCH)]
        batch = [torch.stack(parts) for parts in zip(*deferred)]
        finish_runs: dict[str, list[float]] = {"wall": [], "cpu": []}
        for r in range(args.rounds):
            for clock, value in zip(("wall", "cpu"), measure(lambda i: transforms["fast"].finish(*batch), 1,
                                                              args.seconds)):
                finish_runs[clock].append(value * FINISH_BATCH)
            for s, fns in pipelines.items():
                for k, fn in fns.items():
                    wall, cpu = measure(fn, args.images, args.seconds)
                    runs[s][k]["wall"].append(wall)
                    runs[s][k]["cpu"].append(cpu)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{s} {k} {runs[s][k]['cpu'][-1]:.0f}" for s in runs for k in runs[s]) + " img/s per CPU s", flush=True)
    results = {}
    for s, per in runs.items():
        results[s] = {k: {"img_s_cpu": spread(v["cpu"]), "img_s_wall": spread(v["wall"])} for k, v in per.items()}
        for clock in ("cpu", "wall"):  # each round's ratio: the two ran minutes apart at most
            for name in ("fast", "today", "floor"):
                results[s][f"{name}_over_reference_{clock}"] = spread(
                    [a / b for a, b in zip(per[name][clock], per["reference"][clock])], digits=2)
    verdict = {s: {"fast_img_s_cpu_median": results[s]["fast"]["img_s_cpu"]["median"],
                   "fast_over_reference_cpu_median": results[s]["fast_over_reference_cpu"]["median"],
                   "meets_400_img_s": results[s]["fast"]["img_s_cpu"]["median"] >= TARGET_IMG_S,
                   "meets_2_9x": results[s]["fast_over_reference_cpu"]["median"] >= TARGET_RATIO,
                   "floor_over_reference_cpu_median": results[s]["floor_over_reference_cpu"]["median"]}
               for s in results}
    results["finish_cpu"] = {"img_s_cpu": spread(finish_runs["cpu"]), "img_s_wall": spread(finish_runs["wall"]),
                             "batch": FINISH_BATCH, "note": "runs on the training device; here on this CPU"}
    report = {"machine": {**info, "load_avg_1m_after": round(os.getloadavg()[0], 2)},
              "settings": {"images": args.images, "jpeg_kB": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
                           "image_px": list(Image.open(io.BytesIO(jpegs[0])).size), "rounds": args.rounds,
                           "seconds_per_run": args.seconds, "torch_threads": torch.get_num_threads(),
                           "views": "224 px patch view (bicubic), 112 px tokenizer view", "smoke": args.smoke},
              "anchor_source": anchor_source, "shard_source": shard_from,
              "targets": {"img_s_per_core": TARGET_IMG_S, "x_reference": TARGET_RATIO}, "verdict": verdict,
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(verdict))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
