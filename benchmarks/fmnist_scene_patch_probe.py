"""What a backbone knows about the Fashion-MNIST scenes before any segmentation training: a dense linear probe.

The segmentation benchmark (``fmnist_segment_pretrained_vs_scratch.py``) fine-tunes everything, so it cannot tell
"the pretraining learned nothing" from "the fine-tuning learns it anyway". This probe freezes each backbone and
trains one linear layer on its patch features to predict each patch's class:

1. every scene of an ADE20K-layout export (``export_fmnist_scenes``) is cut into non-overlapping windows of the
   model's size (64 px scenes, a 32 px model: 4 windows), normalised as the segment job normalises;
2. the backbone (``BeitSegmenter``'s, loaded as ``segment.init_from`` loads it) gives the features of its four
   out-blocks; the probe reads the last block's, or the four concatenated (``--features all``), standardised;
3. a linear classifier is trained (Adam, ``--steps`` minibatches) on the training scenes' patches, each labelled
   with the class most of its pixels have;
4. on the validation scenes each patch's prediction covers its pixels, scored against the pixel labels like the
   segment job (mIoU, mAcc, aAcc, per-class IoU).

Every backbone is probed with the same classifier seed and the same minibatches. ``random`` stands for the
initialisation drawn with ``--seed``, as a scratch arm starts.

    python benchmarks/fmnist_scene_patch_probe.py --scenes runs/bench_fmnist_segment/data/scenes_1000_1000_seed0 \\
        --weights random runs/bench_fmnist_segment/pretrain --json /tmp/probe.json     # ~30 s on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beit_scale.checkpoint import RunLayout  # noqa: E402
from beit_scale.data.segmentation import ADE20KFolder, SegEvalTransform  # noqa: E402
from beit_scale.models.segmentation import BeitSegmenter  # noqa: E402
from beit_scale.models.zoo import get_spec  # noqa: E402
from beit_scale.train.seg_metrics import IGNORE_INDEX, confusion_matrix, scores  # noqa: E402

CLASS_NAMES = ["background", "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle_boot"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", required=True, help="an export_fmnist_scenes folder (images/ and annotations/)")
    p.add_argument("--weights", nargs="+", required=True,
                   help="backbones to probe: 'random', finished run folders or .safetensors files")
    p.add_argument("--model", default="beit_tiny_patch4_32", help="zoo model of every backbone (default %(default)s)")
    p.add_argument("--features", choices=("last", "all"), default="last",
                   help="the last out-block's features, or the four out-blocks' concatenated")
    p.add_argument("--steps", type=int, default=300, help="minibatches of the linear classifier (default 300)")
    p.add_argument("--batch", type=int, default=8192, help="patches per minibatch (default 8192)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's lr (default 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or not args.lr > 0:
        p.error("--steps, --batch and --lr must be positive")
    if len(set(args.weights)) < len(args.weights):
        p.error(f"--weights {' '.join(args.weights)}: a backbone is named twice (each is probed and reported once)")
    for w in args.weights:
        if w == "random":
            continue
        path = Path(w)
        if path.is_dir() and not RunLayout(path).model.is_file():
            p.error(f"--weights {w}: no {RunLayout(path).model.name} in it, so not a finished run")
        if not path.is_dir() and not (path.is_file() and path.suffix == ".safetensors"):
            p.error(f"--weights {w}: neither 'random', a run folder nor a .safetensors file")
    return args


def load_split(root: str, split: str, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's scenes as ``(N, 3, window, window)`` normalised windows and ``(N, window, window)`` labels."""
    base = ADE20KFolder(root, split, reduce_zero_label=False)
    first = base[0][0]
    transform = SegEvalTransform((first.width, first.height))  # the segment job's normalisation, at scale 1
    images, labels = zip(*(transform(*base[i]) for i in range(len(base))))
    odd = next((i for i, (x, y) in enumerate(zip(images, labels))
                if (x.shape, y.shape) != (images[0].shape, labels[0].shape)), None)
    if odd is not None:  # the label keeps the file's size; the image is rescaled to scene 0's, keeping its ratio
        raise SystemExit(f"{root} {split}: scene {odd} is {tuple(labels[odd].shape)} px where scene 0 is "
                         f"{tuple(labels[0].shape)} px; the probe needs scenes of one size (an export_fmnist_scenes "
                         "folder)")
    images, labels = torch.stack(images), torch.stack(labels)
    if images.shape[-1] % window or images.shape[-2] % window:
        raise SystemExit(f"{root} {split}: {tuple(images.shape[-2:])} px scenes do not split into {window} px windows")
    tiles = images.unfold(2, window, window).unfold(3, window, window)  # (N, 3, h, w, window, window)
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, window, window)
    label_tiles = labels.unfold(1, window, window).unfold(2, window, window).reshape(-1, window, window)
    return tiles.contiguous(), label_tiles.contiguous()


def patch_labels(labels: torch.Tensor, patch: int, num_classes: int) -> torch.Tensor:
    """The class most pixels of each patch have (ignored pixels left out; all ignored: IGNORE_INDEX)."""
    keep = labels != IGNORE_INDEX
    onehot = F.one_hot(torch.where(keep, labels, 0), num_classes) * keep.unsqueeze(-1)
    counts = F.avg_pool2d(onehot.permute(0, 3, 1, 2).float(), patch)  # (N, K, h, w)
    return torch.where(counts.sum(1) > 0, counts.argmax(1), IGNORE_INDEX)


def backbone(model: str, weights: str, window: int, seed: int) -> BeitSegmenter:
    torch.manual_seed(seed)
    net = BeitSegmenter(get_spec(model), len(CLASS_NAMES), window, drop_path=0.0, channels=32, aux_channels=32)
    if weights != "random":
        from safetensors.torch import load_file

        path = Path(weights)
        net.load_backbone(load_file(str(RunLayout(path).model if path.is_dir() else path)))
    return net.eval()


@torch.no_grad()
def features(net: BeitSegmenter, images: torch.Tensor, which: str) -> torch.Tensor:
    """``(N * h * w, C)`` patch features, in the patch order of :func:`patch_labels`."""
    out = []
    for chunk in images.split(256):
        levels = net.backbone.forward_intermediates(chunk, indices=net.out_indices, intermediates_only=True)
        out.append(levels[-1] if which == "last" else torch.cat(levels, 1))
    f = torch.cat(out)  # (N, C, h, w)
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Predicted class of every validation patch by a linear layer trained on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    keep = train_y != IGNORE_INDEX
    train_x, train_y = train_x[keep], train_y[keep]
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    linear = torch.nn.Linear(train_x.shape[1], len(CLASS_NAMES))
    opt = torch.optim.Adam(linear.parameters(), lr=args.lr)
    for _ in range(args.steps):
        idx = torch.randint(0, len(train_x), (min(args.batch, len(train_x)),), generator=gen)
        loss = F.cross_entropy(linear(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return linear(val_x).argmax(1)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec = get_spec(args.model)
    window, patch = spec.img_size, spec.patch_size
    start = time.perf_counter()
    train_images, train_labels = load_split(args.scenes, "training", window)
    val_images, val_labels = load_split(args.scenes, "validation", window)
    train_y = patch_labels(train_labels, patch, len(CLASS_NAMES)).reshape(-1)
    grid = window // patch
    results = {}
    for weights in args.weights:
        net = backbone(args.model, weights, window, args.seed)
        pred = probe(features(net, train_images, args.features), train_y, features(net, val_images, args.features),
                     args)
        pixels = pred.view(-1, 1, grid, grid).float()
        pixels = F.interpolate(pixels, scale_factor=patch, mode="nearest").view(-1, window, window).long()
        s = scores(confusion_matrix(pixels, val_labels, len(CLASS_NAMES)), CLASS_NAMES)
        results[weights] = {"mIoU": s["mIoU"], "mAcc": s["mAcc"], "aAcc": s["aAcc"],
                            "per_class_iou": {n: s[f"IoU.{n}"] for n in CLASS_NAMES}}
        print(f"[patch-probe] {weights}: mIoU {s['mIoU']:.4f} mAcc {s['mAcc']:.4f} aAcc {s['aAcc']:.4f}", flush=True)
    result = {"benchmark": "fmnist_scene_patch_probe", "scenes": str(args.scenes), "model": args.model,
              "features": args.features, "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
              "train_windows": len(train_images), "val_windows": len(val_images), "probes": results,
              "wall_s": round(time.perf_counter() - start, 1)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
