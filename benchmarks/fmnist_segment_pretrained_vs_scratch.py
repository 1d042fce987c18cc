"""Segmentation on real data: a MIM-pretrained tiny BEiT against random initialisation on Fashion-MNIST scenes,
trained on 10% of the labelled scenes, scored by mIoU on held-out scenes.

Runs the real CLI jobs, one process each, with the functions of ``benchmarks/fmnist_pretrain_vs_scratch.py``:

1. export Fashion-MNIST scenes (``export_fmnist_scenes``: 64 px canvases of 2-4 real items, labels class + 1,
   background 0, 11 classes): a nominal 10,000 training scenes of which the first 10%, 1,000, are labelled (the
   segment job has no train-fraction setting: they are exported again on their own) and 1,000 validation scenes
   whose items come from the Fashion-MNIST test split;
2. the pretrained weights: ``--pretrained RUN_OR_FILE`` (a finished pretraining run folder or its
   ``model.safetensors``), or, without it, MIM pretraining here on the 10,000 training scenes without their labels
   (``pretrain --config bench_fmnist_segment_pretrain``), with a dVAE tokenizer from ``--tokenizer FILE`` or trained
   here on Fashion-MNIST (``train-tokenizer --config quickstart_tokenizer``, as the first benchmark);
3. ``segment --config bench_fmnist_segment segment.init_from=<2>``: BEiT + UperNet on the 1,000 labelled scenes;
4. ``segment --config bench_fmnist_segment segment.init_from=``: the same job from random initialisation.

Steps 3 and 4 differ only in ``segment.init_from`` (and their output folders): same recipe, steps, batch, seed,
scenes, data order and augmentation. Both are scored on the validation scenes by sliding-window mIoU at 64 px;
mIoU, mAcc, aAcc and the IoU of each class of both arms, the settings, the machine and the wall time of every
stage go to a JSON file, and the verdict is printed.

    python benchmarks/fmnist_segment_pretrained_vs_scratch.py --jobs 2   # 62-79 min on 2 cores
    python benchmarks/fmnist_segment_pretrained_vs_scratch.py --out-dir /tmp/smoke --scale 0.016 --steps-scale 0.004 \\
        --tokenizer /tmp/bench/tokenizer/tokenizer.safetensors       # a smoke run, about a minute

``--jobs 2`` trains the two segmentation arms at the same time, each with half the cores' threads: the same jobs
(their results do not depend on it beyond float rounding), about 1.5x sooner on 2 cores.
``--pretrained runs/bench_fmnist/pretrain`` starts the first arm from the first benchmark's Fashion-MNIST
pretraining instead (measured: worse than random initialisation on these scenes; see the README).
``--scale`` multiplies the number of scenes and every stage's steps (warmup and checkpoint intervals too); below 1
the pretraining has no reason to win, it only shows that the pipeline runs; ``--steps-scale`` overrides the factor on
the steps alone. At ``--scale 1`` (and ``--steps-scale 1``) the JSON goes to
``benchmarks/results/fmnist_segment_pretrained_vs_scratch.json`` unless ``--json`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fmnist_pretrain_vs_scratch import (RECIPES, check_scales, prepare, resolved_config,  # noqa: E402
                                                   run_job, run_jobs, scaled, step_overrides, versions)
from benchmarks.quickstart import cpu_model  # noqa: E402  (the machine record of the other benchmarks)
from beit_scale.checkpoint import RunLayout  # noqa: E402
from beit_scale.data.fmnist_scenes import export_fmnist_scenes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fmnist_segment_pretrained_vs_scratch.json"
RECIPE = "bench_fmnist_segment"
PRETRAIN_RECIPE = "bench_fmnist_segment_pretrain"
NOMINAL_TRAIN_SCENES, VAL_SCENES = 10000, 1000  # at --scale 1
LABELLED_FRACTION = 0.1  # of the nominal training scenes; only these are exported
ARMS = ("segment_pretrained", "segment_scratch")
METRICS = ("mIoU", "mAcc", "aAcc")
PRETRAIN_KEYS = ("final_loss", "masked_token_accuracy", "majority_token_accuracy", "train_masked_token_accuracy",
                 "target_codebook_usage", "steps", "images_per_second")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/bench_fmnist_segment", help="scenes and the run folders go here")
    p.add_argument("--pretrained", default=None,
                   help="a finished pretraining run folder or its .safetensors weights (default: pretrain here on "
                        "the unlabelled training scenes, at --scale)")
    p.add_argument("--tokenizer", default=None,
                   help="the pretraining's tokenizer file (e.g. runs/bench_fmnist/tokenizer/tokenizer.safetensors; "
                        "default: train one here on Fashion-MNIST)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="factor on scenes and steps of every stage, e.g. 0.02 for a smoke run (default 1)")
    p.add_argument("--steps-scale", type=float, default=None,
                   help="factor on the steps only (default: --scale); below --scale for a shorter smoke run")
    p.add_argument("--seed", type=int, default=0, help="run.seed of every stage and the scenes' seed")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=1,
                   help="2: train both segmentation arms at once, each on half the cores (on 2 cores 1.5x faster "
                        "than one after the other; each arm's images_per_second is then its share's)")
    p.add_argument("--json", default=None, help=f"result file (default: {RESULTS.relative_to(ROOT)} at --scale 1, "
                   f"else <out-dir>/{RESULTS.name})")
    args = p.parse_args(argv)
    check_scales(p, args)
    if args.pretrained and args.tokenizer:
        p.error("--tokenizer is for the pretraining this script runs; with --pretrained nothing is pretrained here")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        p.error(f"--tokenizer={args.tokenizer}: no such file")
    if args.pretrained:
        source = Path(args.pretrained)
        if source.is_dir() and not RunLayout(source).model.is_file():
            p.error(f"--pretrained={source}: no {RunLayout(source).model.name} in it, so not a finished run (still "
                    "training?); wait for it to finish, or pass a .safetensors file")
        if not source.is_dir() and not (source.is_file() and source.suffix == ".safetensors"):
            p.error(f"--pretrained={source}: neither a run folder nor a .safetensors file")
    return args


def export_scenes(out_dir: Path, scale: float, seed: int, global_batch: int, wall: dict) -> tuple[Path, int, int, int]:
    """Export the labelled training scenes and the validation scenes into a folder named by their counts (an export
    of other counts is kept beside it); (root, nominal training scenes, labelled scenes, validation scenes)."""
    nominal = scaled(NOMINAL_TRAIN_SCENES, scale)
    labelled, val = max(1, round(LABELLED_FRACTION * nominal)), scaled(VAL_SCENES, scale)
    if labelled < global_batch:
        raise SystemExit(f"only {labelled} labelled scenes at --scale {scale}, fewer than one batch ({global_batch}); "
                         "use a larger --scale")
    start = time.perf_counter()
    root = export_fmnist_scenes(out_dir / "data" / f"scenes_{labelled}_{val}_seed{seed}", labelled, val, seed=seed)
    wall["export_scenes"] = time.perf_counter() - start
    print(f"[segment-bench] scenes: {labelled} labelled training scenes ({LABELLED_FRACTION:.0%} of {nominal}), "
          f"{val} validation scenes, in {root}", flush=True)
    return root, nominal, labelled, val


def export_unlabelled(out_dir: Path, nominal: int, seed: int, wall: dict) -> Path:
    """All ``nominal`` training scenes (the labelled ones are their first scenes, identical by construction) as an
    ImageFolder for the pretraining: ``unlabelled_<n>_seed<s>/scenes`` links to the export's training images."""
    start = time.perf_counter()
    pool = export_fmnist_scenes(out_dir / "data" / f"scenes_{nominal}_1_seed{seed}", nominal, 1, seed=seed)
    root = out_dir / "data" / f"unlabelled_{nominal}_seed{seed}"
    link = root / "scenes"
    if not link.is_symlink():
        root.mkdir(parents=True, exist_ok=True)
        link.symlink_to(pool / "images" / "training", target_is_directory=True)
    wall["export_unlabelled"] = time.perf_counter() - start
    print(f"[segment-bench] pretraining images: the {nominal} training scenes without labels, in {root}", flush=True)
    return root


def pretrain_on_scenes(out_dir: Path, args: argparse.Namespace, nominal: int, steps: dict, overrides: dict,
                       wall: dict) -> dict:
    """The tokenizer (unless ``--tokenizer``) and the MIM pretraining on the unlabelled scenes, into
    ``out_dir/tokenizer`` and ``out_dir/pretrain``; returns the pretraining's summary."""
    if args.tokenizer:
        tokenizer = Path(args.tokenizer).resolve()
    else:
        _, _, _, _, data = prepare(out_dir, ("tokenizer",), args.scale, args.seed, wall, "segment-bench")
        ov, steps["tokenizer"] = step_overrides(RECIPES["tokenizer"], args.steps_scale)
        overrides["tokenizer"] = [f"run.output_dir={out_dir / 'tokenizer'}", *data, *ov]
        _, wall["tokenizer"] = run_job("tokenizer", "train-tokenizer", RECIPES["tokenizer"], overrides["tokenizer"],
                                       out_dir)
        tokenizer = RunLayout(out_dir / "tokenizer").tokenizer
    unlabelled = export_unlabelled(out_dir, nominal, args.seed, wall)
    ov, steps["pretrain"] = step_overrides(PRETRAIN_RECIPE, args.steps_scale)
    overrides["pretrain"] = [f"run.output_dir={out_dir / 'pretrain'}", f"tokenizer.path={tokenizer}",
                             f"data.root={unlabelled}", f"run.seed={args.seed}", *ov]
    summary, wall["pretrain"] = run_job("pretrain", "pretrain", PRETRAIN_RECIPE, overrides["pretrain"], out_dir)
    return summary


def machine() -> dict:
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_avg_1m_before": round(os.getloadavg()[0], 2),
            "platform": platform.platform(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    host = machine()  # the load before this benchmark's own jobs
    out_dir = Path(args.out_dir).resolve()
    full = args.scale == 1 and args.steps_scale == 1
    json_path = Path(args.json) if args.json else (RESULTS if full else out_dir / RESULTS.name)
    total_start = time.perf_counter()
    wall: dict[str, float] = {}
    steps, overrides = {}, {}
    for arm in (*ARMS, *(() if args.pretrained else ("pretrain",))):  # a left-over checkpoint would resume
        if (out_dir / arm).exists():
            print(f"[segment-bench] removing the previous {out_dir / arm}", flush=True)
            shutil.rmtree(out_dir / arm)

    ov, steps["segment"] = step_overrides(RECIPE, args.steps_scale)
    scenes, nominal, labelled, val = export_scenes(out_dir, args.scale, args.seed, steps["segment"]["global_batch"],
                                                   wall)
    pt_summary: dict = {}
    if args.pretrained:
        pretrained = Path(args.pretrained).resolve()
        summary_file = RunLayout(pretrained).summary if pretrained.is_dir() else None
        if summary_file is not None and summary_file.is_file():
            pt_summary = json.loads(summary_file.read_text())
    else:
        pt_summary = pretrain_on_scenes(out_dir, args, nominal, steps, overrides, wall)
        pretrained = out_dir / "pretrain"

    for arm, init_from, name in ((ARMS[0], str(pretrained), "fmnist_pt_seg"), (ARMS[1], "", "fmnist_scratch_seg")):
        overrides[arm] = [f"run.output_dir={out_dir / arm}", f"run.name={name}", f"segment.init_from={init_from}",
                          f"data.root={scenes}", f"run.seed={args.seed}", *ov]
    start = time.perf_counter()
    done = run_jobs({arm: ("segment", RECIPE, overrides[arm]) for arm in ARMS}, out_dir, args.jobs)
    summaries = {arm: summary for arm, (summary, _) in done.items()}
    wall.update({arm: seconds for arm, (_, seconds) in done.items()})
    wall["segment_stage"] = time.perf_counter() - start
    wall["total"] = time.perf_counter() - total_start

    configs = {arm: resolved_config(out_dir / arm) for arm in ARMS}
    differs = {k for k in configs[ARMS[1]] if k != "run" and configs[ARMS[0]][k] != configs[ARMS[1]][k]}
    assert differs <= {"segment"}, differs  # only init_from may differ between the two arms
    assert {k for k, v in configs[ARMS[0]]["segment"].items() if v != configs[ARMS[1]]["segment"][k]} <= {"init_from"}
    pre, scr = summaries[ARMS[0]], summaries[ARMS[1]]
    cfg = configs[ARMS[1]]
    result = {
        "benchmark": "fmnist_segment_pretrained_vs_scratch",
        "mIoU_pretrained": pre["mIoU"],
        "mIoU_scratch": scr["mIoU"],
        "mIoU_gain": pre["mIoU"] - scr["mIoU"],
        "pretraining_wins": pre["mIoU"] > scr["mIoU"],
        "arms": {arm.removeprefix("segment_"): {**{k: s[k] for k in METRICS}, "per_class_iou": s["per_class_iou"],
                                                "final_loss": s.get("final_loss"),
                                                "images_per_second": s.get("images_per_second"),
                                                "init_from": s.get("init_from") or "",
                                                "init_lineage": s.get("init_lineage") or ""}
                 for arm, s in summaries.items()},
        "settings": {
            "scale": args.scale,
            "steps_scale": args.steps_scale,
            "seed": args.seed,
            "jobs": args.jobs,
            "model": cfg["model"]["name"],
            "recipe": RECIPE,
            "nominal_train_scenes": nominal,
            "labelled_fraction": LABELLED_FRACTION,
            "labelled_scenes": pre["train_images"],
            "labelled_note": "the segment job has no train-fraction setting: only the first "
                             f"{LABELLED_FRACTION:.0%} of the nominal training scenes are exported again on their own and "
                             "trained on; the pretraining reads all of them without labels",
            "val_scenes": pre["val_images"],
            "canvas_px": 64,
            "pretrained": {"source": "given (--pretrained)" if args.pretrained else
                           f"trained here ({PRETRAIN_RECIPE}) on the {nominal} training scenes without labels",
                           "tokenizer": "given (--tokenizer)" if args.tokenizer else
                           (None if args.pretrained else "trained here on Fashion-MNIST"),
                           "path": str(pretrained) if args.pretrained else "<out-dir>/pretrain",
                           **{k: pt_summary.get(k) for k in PRETRAIN_KEYS}},
            "steps": steps,
            "segment": {k: v for k, v in cfg["segment"].items() if k not in ("init_from", "class_names")},
            "optim": cfg["optim"],
            "train": cfg["train"],
            "drop_path": cfg["model"]["drop_path"],
            "overrides": {k: [o.replace(str(out_dir), "<out-dir>") for o in v] for k, v in overrides.items()},
        },
        "machine": host,
        "versions": versions(),
        "wall_s": {k: round(v, 1) for k, v in wall.items()},
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "pretraining wins" if result["pretraining_wins"] else "pretraining does NOT win"
    print(f"[segment-bench] mIoU on {pre['val_images']} validation scenes after training on {labelled} labelled ones: "
          f"pretrained {pre['mIoU']:.4f}, scratch {scr['mIoU']:.4f} ({verdict}, {result['mIoU_gain']:+.4f}); "
          f"wall {wall['total'] / 60:.1f} min; results in {json_path}", flush=True)
    for arm in ARMS:
        ious = " ".join(f"{n}={'-' if v is None else f'{v:.3f}'}" for n, v in summaries[arm]["per_class_iou"].items())
        print(f"[segment-bench]   {arm}: mAcc {summaries[arm]['mAcc']:.4f}, aAcc {summaries[arm]['aAcc']:.4f}; "
              f"IoU {ious}", flush=True)
    return result


if __name__ == "__main__":
    main()
