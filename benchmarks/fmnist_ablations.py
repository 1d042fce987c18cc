"""The BEiT paper's ablations in miniature on Fashion-MNIST: blockwise or random masking, visual tokens or pixels as
the target, against no pretraining; top-1 after fine-tuning on 10% of the labels.

Runs the real CLI jobs, one process each, with the functions of ``benchmarks/fmnist_pretrain_vs_scratch.py``:

1. export Fashion-MNIST to ImageFolder (60,000 training, 10,000 test images);
2. one tokenizer: ``train-tokenizer --config quickstart_tokenizer`` (or ``--tokenizer FILE``, trained before);
3. three pretrainings of ``bench_fmnist_pretrain``, the same steps, batch, seed and data, that differ only in
   the masking section: ``blockwise_tokens`` (BEiT), ``random_tokens`` (``masking.kind=random``, the same number
   of masked patches) and ``blockwise_pixels`` (``masking.target=pixels``: each masked patch's pixels, normalised
   per patch, regressed by a linear head with an MSE loss; no tokenizer is read);
4. four fine-tunings of ``bench_fmnist_finetune`` on 10% of the labels (600 per class, seeded), one from each
   pretraining and one from random initialisation (``scratch``), that differ only in ``finetune.init_from``.

All four are evaluated on the 10,000 test images; top-1/top-5 of each arm, the pretraining summaries, the settings
and the wall time of every stage go to a JSON file, and a table is printed.

    python benchmarks/fmnist_ablations.py --out-dir runs/bench_fmnist_ablations     # hours on 2 CPU cores
    python benchmarks/fmnist_ablations.py --out-dir /tmp/smoke --scale 0.012        # a smoke run, 2-3 min

``--scale`` multiplies the number of images and every stage's steps as in the other benchmark; ``--steps-scale``
shrinks the steps further (a smoke run on the same images). ``--jobs 2`` runs two pretrainings (then two
fine-tunings) at a time: for smoke runs, where process start-up dominates; the timings of a measured run want
``--jobs 1``. At ``--scale 1`` the JSON goes to ``benchmarks/results/fmnist_ablations.json`` unless ``--json`` says
otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fmnist_pretrain_vs_scratch import (RECIPES, check_scales,  # noqa: E402
                                                   prepare, resolved_config, run_job, run_jobs, step_overrides,
                                                   versions)
from beit_scale.checkpoint import RunLayout  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fmnist_ablations.json"
# Each arm's pretraining overrides (after the shared ones, so they win); None: fine-tuned from random init.
ARMS: dict[str, list[str] | None] = {
    "blockwise_tokens": ["masking.kind=blockwise", "masking.target=tokens"],
    "random_tokens": ["masking.kind=random", "masking.target=tokens"],
    "blockwise_pixels": ["masking.kind=blockwise", "masking.target=pixels", "tokenizer.path="],
    "scratch": None,
}
PRETRAIN_KEYS = ("final_loss", "masked_token_accuracy", "majority_token_accuracy", "target_codebook_usage",
                 "masked_pixel_loss", "zero_prediction_pixel_loss", "images_per_second")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/bench_fmnist_ablations", help="data and every run folder go here")
    p.add_argument("--scale", type=float, default=1.0,
                   help="factor on images and steps of every stage, e.g. 0.012 for a smoke run (default 1)")
    p.add_argument("--steps-scale", type=float, default=None,
                   help="factor on the steps only (default: --scale); below --scale for a shorter smoke run")
    p.add_argument("--seed", type=int, default=0, help="run.seed of every stage (weights, data order, 10%% subset)")
    p.add_argument("--tokenizer", default=None,
                   help="a trained tokenizer file (e.g. <other out-dir>/tokenizer/tokenizer.safetensors) to use "
                        "instead of training one")
    p.add_argument("--jobs", type=int, default=1,
                   help="jobs run at a time within a stage (default 1; each job's wall time is then its own)")
    p.add_argument("--json", default=None, help=f"result file (default: {RESULTS.relative_to(ROOT)} at --scale 1, "
                   "else <out-dir>/fmnist_ablations.json)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs={args.jobs} must be >= 1")
    check_scales(p, args)
    if args.tokenizer and not Path(args.tokenizer).is_file():
        p.error(f"--tokenizer={args.tokenizer}: no such file")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    full = args.scale == 1 and args.steps_scale == 1
    json_path = Path(args.json) if args.json else (RESULTS if full else out_dir / RESULTS.name)
    stages = ([] if args.tokenizer else ["tokenizer"]) + [f"pretrain_{a}" for a, ov in ARMS.items() if ov is not None]
    stages += [f"finetune_{a}" for a in ARMS]
    total_start = time.perf_counter()
    wall: dict[str, float] = {}
    _, _, train_n, test_n, data = prepare(out_dir, stages, args.scale, args.seed, wall, "ablations")
    steps, overrides, summaries = {}, {}, {}

    if args.tokenizer:
        tokenizer = Path(args.tokenizer).resolve()
    else:
        ov, steps["tokenizer"] = step_overrides(RECIPES["tokenizer"], args.steps_scale)
        overrides["tokenizer"] = [f"run.output_dir={out_dir / 'tokenizer'}", *data, *ov]
        summaries["tokenizer"], wall["tokenizer"] = run_job("tokenizer", "train-tokenizer", RECIPES["tokenizer"],
                                                            overrides["tokenizer"], out_dir)
        tokenizer = RunLayout(out_dir / "tokenizer").tokenizer

    ov, steps["pretrain"] = step_overrides(RECIPES["pretrain"], args.steps_scale)
    for arm, arm_ov in ARMS.items():
        if arm_ov is not None:
            overrides[f"pretrain_{arm}"] = [f"run.output_dir={out_dir / f'pretrain_{arm}'}", f"run.name=fmnist_{arm}",
                                            f"tokenizer.path={tokenizer}", *data, *ov, *arm_ov]
    start = time.perf_counter()
    pretrains = {s: ("pretrain", RECIPES["pretrain"], ov) for s, ov in overrides.items() if s.startswith("pretrain_")}
    done = run_jobs(pretrains, out_dir, args.jobs)
    for stage, (summary, seconds) in done.items():
        summaries[stage], wall[stage] = summary, seconds
    wall["pretrain_stage"] = time.perf_counter() - start

    ov, steps["finetune"] = step_overrides(RECIPES["finetune"], args.steps_scale)
    for arm, arm_ov in ARMS.items():
        init_from = "" if arm_ov is None else str(out_dir / f"pretrain_{arm}")
        overrides[f"finetune_{arm}"] = [f"run.output_dir={out_dir / f'finetune_{arm}'}", f"run.name=fmnist_{arm}_ft",
                                        f"finetune.init_from={init_from}", *data, *ov]
    start = time.perf_counter()
    done = run_jobs({f"finetune_{a}": ("finetune", RECIPES["finetune"], overrides[f"finetune_{a}"]) for a in ARMS},
                    out_dir, args.jobs)
    finetunes = {stage.removeprefix("finetune_"): summary for stage, (summary, _) in done.items()}
    wall.update({stage: seconds for stage, (_, seconds) in done.items()})
    wall["finetune_stage"] = time.perf_counter() - start
    wall["total"] = time.perf_counter() - total_start

    configs = {arm: resolved_config(out_dir / f"finetune_{arm}") for arm in ARMS}
    for arm, cfg in configs.items():  # the fine-tunings differ in their weights only
        differs = {k for k in cfg if k != "run" and cfg[k] != configs["scratch"][k]}
        assert differs <= {"finetune"}, (arm, differs)
        assert {k for k, v in cfg["finetune"].items() if v != configs["scratch"]["finetune"][k]} <= {"init_from"}
    pretrain_cfgs = {arm: resolved_config(out_dir / f"pretrain_{arm}") for arm, ov in ARMS.items() if ov is not None}
    for arm, cfg in pretrain_cfgs.items():  # the pretrainings differ in their masking section (and tokenizer path)
        differs = {k for k in cfg if k not in ("run", "tokenizer") and cfg[k] != pretrain_cfgs["blockwise_tokens"][k]}
        assert differs <= {"masking"}, (arm, differs)

    ft_cfg = configs["scratch"]
    top1 = {arm: finetunes[arm]["top1"] for arm in ARMS}
    result = {
        "benchmark": "fmnist_ablations",
        "top1": top1,
        "top5": {arm: finetunes[arm]["top5"] for arm in ARMS},
        "top1_gain_over_scratch": {arm: top1[arm] - top1["scratch"] for arm in ARMS if arm != "scratch"},
        "best": max(top1, key=top1.get),
        "arms": {arm: {"masking": pretrain_cfgs[arm]["masking"] if arm in pretrain_cfgs else None,
                       "pretrain_overrides": ov} for arm, ov in ARMS.items()},
        "settings": {
            "scale": args.scale,
            "steps_scale": args.steps_scale,
            "seed": args.seed,
            "model": ft_cfg["model"]["name"],
            "train_images": train_n,
            "test_images": finetunes["scratch"]["val_images"],
            "labelled_images": finetunes["scratch"]["train_images"],
            "train_fraction": ft_cfg["finetune"]["train_fraction"],
            "recipes": RECIPES,
            "tokenizer": "trained here" if not args.tokenizer else "given (--tokenizer)",
            "steps": steps,
            "overrides": {k: [o.replace(str(out_dir), "<out-dir>") for o in v] for k, v in overrides.items()},
            "cpu_count": os.cpu_count(),
            "versions": versions(),
        },
        "wall_s": {k: round(v, 1) for k, v in wall.items()},
        "tokenizer": {k: summaries["tokenizer"].get(k) for k in ("tokenizer_codebook_usage", "tokenizer_perplexity")}
        if "tokenizer" in summaries else None,
        "pretrain": {arm: {k: v for k, v in summaries[f"pretrain_{arm}"].items() if k in PRETRAIN_KEYS}
                     for arm in pretrain_cfgs},
        "finetune": {arm: {k: finetunes[arm].get(k) for k in ("final_loss", "images_per_second")} for arm in ARMS},
    }
    assert all(math.isfinite(v) for v in top1.values()), top1
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[ablations] top-1 on {result['settings']['test_images']} test images after fine-tuning on "
          f"{result['settings']['labelled_images']} labelled ones:", flush=True)
    for arm in ARMS:
        gain = "" if arm == "scratch" else f" ({result['top1_gain_over_scratch'][arm]:+.4f} over scratch)"
        print(f"[ablations]   {arm:<17} {top1[arm]:.4f}{gain}", flush=True)
    print(f"[ablations] wall {wall['total'] / 60:.1f} min; results in {json_path}", flush=True)
    return result


if __name__ == "__main__":
    main()
