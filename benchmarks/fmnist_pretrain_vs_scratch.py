"""Proof on real data: BEiT pretraining beats random initialisation on Fashion-MNIST with 10% of the labels.

Runs the real CLI jobs, one process each, as a user would (``python -m beit_scale.cli <job> --config ...``):

1. export Fashion-MNIST (Debian's dataset-fashion-mnist) to ImageFolder: 60,000 training, 10,000 test images;
2. ``train-tokenizer --config quickstart_tokenizer`` on the training images (dVAE, 128 codes, 8x8 tokens);
3. ``pretrain --config bench_fmnist_pretrain``: MIM on the 60,000 training images, labels unused;
4. ``finetune --config bench_fmnist_finetune finetune.init_from=<3>``: 10% of the labels (600 per class, seeded);
5. ``finetune --config bench_fmnist_finetune finetune.init_from=``: the same job from random initialisation.

Steps 4 and 5 differ only in ``finetune.init_from`` (and their output folders): same recipe, steps, batch, seed,
labelled subset, data order and augmentation. Both are evaluated on the 10,000 test images. The top-1
accuracies, the settings and the wall time of every stage go to a JSON file; the verdict is printed.

    python benchmarks/fmnist_pretrain_vs_scratch.py --out-dir runs/bench_fmnist   # 47 min on 2 CPU cores
    python benchmarks/fmnist_pretrain_vs_scratch.py --out-dir /tmp/smoke --scale 0.012   # a smoke run, 1-2 min

``--scale`` multiplies the number of images and every stage's steps (warmup and checkpoint intervals too);
below 1 the pretraining has no reason to win, it only shows that the pipeline runs. At ``--scale 1`` the
JSON goes to ``benchmarks/results/fmnist_pretrain_vs_scratch.json`` unless ``--json`` says otherwise.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from beit_scale.checkpoint import RunLayout
from beit_scale.config import load_config
from beit_scale.data import export_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fmnist_pretrain_vs_scratch.json"
TRAIN_IMAGES, TEST_IMAGES = 60000, 10000  # the whole Fashion-MNIST train and t10k splits
RECIPES = {"tokenizer": "quickstart_tokenizer", "pretrain": "bench_fmnist_pretrain",
           "finetune": "bench_fmnist_finetune"}
STAGES = ("tokenizer", "pretrain", "finetune_pretrained", "finetune_scratch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/bench_fmnist", help="data and the four run folders go here")
    p.add_argument("--scale", type=float, default=1.0,
                   help="factor on images and steps of every stage, e.g. 0.02 for a smoke run (default 1)")
    p.add_argument("--seed", type=int, default=0, help="run.seed of every stage (weights, data order, 10%% subset)")
    p.add_argument("--json", default=None, help=f"result file (default: {RESULTS.relative_to(ROOT)} at --scale 1, "
                   "else <out-dir>/fmnist_pretrain_vs_scratch.json)")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error(f"--scale={args.scale} must be in (0, 1]")
    return args


def check_scales(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--scale`` and ``--steps-scale`` (default: ``--scale``) of the benchmarks that have both, each in (0, 1]."""
    if not 0 < args.scale <= 1:
        p.error(f"--scale={args.scale} must be in (0, 1]")
    if args.steps_scale is None:
        args.steps_scale = args.scale
    if not 0 < args.steps_scale <= 1:
        p.error(f"--steps-scale={args.steps_scale} must be in (0, 1]")


def scaled(n: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, round(n * scale))


def step_overrides(recipe: str, scale: float) -> tuple[list[str], dict]:
    """Overrides that shrink a recipe's steps by ``scale``, and the resulting step settings."""
    cfg = load_config(recipe)
    steps = scaled(cfg.train.total_steps, scale, minimum=2)
    warmup = min(round(cfg.optim.warmup_steps * scale), steps - 1)
    log_every = min(cfg.train.log_every, max(1, steps // 4))
    every = cfg.checkpoint.every_steps and scaled(cfg.checkpoint.every_steps, scale)
    settings = {"total_steps": steps, "warmup_steps": warmup, "global_batch": cfg.train.global_batch}
    return ([f"train.total_steps={steps}", f"optim.warmup_steps={warmup}", f"train.log_every={log_every}",
             f"checkpoint.every_steps={every}"], settings)


def check_labelled_subset(train_root: Path) -> None:
    """Fail early when the labelled share of a shrunken export is smaller than one fine-tuning batch."""
    ft = load_config(RECIPES["finetune"])
    per_class = [sum(1 for _ in d.glob("*.png")) for d in sorted(train_root.iterdir()) if d.is_dir()]
    labelled = sum(max(1, round(ft.finetune.train_fraction * n)) for n in per_class)
    if labelled < ft.train.global_batch:
        raise SystemExit(f"only {labelled} labelled images at this --scale, fewer than one fine-tuning batch "
                         f"({ft.train.global_batch}); use a larger --scale")


def prepare(out_dir: Path, stages, scale: float, seed: int, wall: dict, tag: str):
    """Remove the previous run folders of ``stages`` (a left-over checkpoint would resume instead of train), export
    Fashion-MNIST at ``scale`` and check its labelled share: (train root, test root, train n, test n, the data
    overrides every stage shares); the export's wall time goes to ``wall``."""
    for stage in stages:
        if (out_dir / stage).exists():
            print(f"[{tag}] removing the previous {out_dir / stage}", flush=True)
            shutil.rmtree(out_dir / stage)
    train_n, test_n = scaled(TRAIN_IMAGES, scale), scaled(TEST_IMAGES, scale)
    start = time.perf_counter()
    train_root = export_fashion_mnist(out_dir / "data", "train", limit=train_n)
    test_root = export_fashion_mnist(out_dir / "data", "test", limit=test_n)
    wall["export"] = time.perf_counter() - start
    check_labelled_subset(train_root)
    print(f"[{tag}] Fashion-MNIST: {train_n} training images in {train_root}, {test_n} test images in {test_root}",
          flush=True)
    return train_root, test_root, train_n, test_n, [f"data.root={train_root}", f"data.val_root={test_root}",
                                                     f"run.seed={seed}"]


def run_job(name: str, job: str, recipe: str, overrides: list[str], out_dir: Path,
            env: dict[str, str] | None = None) -> tuple[dict, float]:
    """Run one CLI job in its own process (environment ``env``, default this one's), output to ``logs/<name>.log``
    and the console; (its summary, wall s)."""
    cmd = [sys.executable, "-m", "beit_scale.cli", job, "--config", recipe, *overrides]
    log_path = out_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env)
        for line in proc.stdout:
            log_file.write(line)
            print(f"[{name}] {line}", end="", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"[bench] {name} failed with exit code {rc} after {wall:.0f} s; full log in {log_path}")
    summary = json.loads(RunLayout(out_dir / name).summary.read_text())
    print(f"[bench] {name} done in {wall:.0f} s", flush=True)
    return summary, wall


def run_jobs(specs: dict[str, tuple[str, str, list[str]]], out_dir: Path,
             jobs: int) -> dict[str, tuple[dict, float]]:
    """:func:`run_job` for each ``{name: (job, recipe, overrides)}``, ``jobs`` at a time; {name: (summary, wall s)}
    in the order of ``specs``. Several at a time share the threads: each job gets ``OMP_NUM_THREADS // jobs`` of
    them (at least 1; without OMP_NUM_THREADS, of the CPU count), where torch would give each all of them."""
    env = None
    if jobs > 1:
        budget = os.environ.get("OMP_NUM_THREADS", "")
        budget = int(budget) if budget.isdigit() and int(budget) > 0 else (os.cpu_count() or 1)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, budget // jobs))}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(run_job, name, job, recipe, overrides, out_dir, env)
                   for name, (job, recipe, overrides) in specs.items()}
        return {name: f.result() for name, f in futures.items()}


def resolved_config(run_dir: Path) -> dict:
    return yaml.safe_load(RunLayout(run_dir).config.read_text())


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "timm", "torchvision"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def tokenizer_and_pretraining(out_dir: Path, scale: float, data: list[str], steps: dict, overrides: dict,
                              wall: dict) -> tuple[dict, dict]:
    """Stages 2 and 3 into ``out_dir/tokenizer`` and ``out_dir/pretrain`` (the latter a finished run folder for
    ``init_from``), their steps shrunk by ``scale``; each stage's steps, overrides and wall time go to the dicts
    ``steps``, ``overrides`` and ``wall``. Returns (tokenizer summary, pretraining summary)."""
    ov, steps["tokenizer"] = step_overrides(RECIPES["tokenizer"], scale)
    overrides["tokenizer"] = [f"run.output_dir={out_dir / 'tokenizer'}", *data, *ov]
    tok_summary, wall["tokenizer"] = run_job("tokenizer", "train-tokenizer", RECIPES["tokenizer"],
                                             overrides["tokenizer"], out_dir)

    ov, steps["pretrain"] = step_overrides(RECIPES["pretrain"], scale)
    overrides["pretrain"] = [f"run.output_dir={out_dir / 'pretrain'}",
                             f"tokenizer.path={RunLayout(out_dir / 'tokenizer').tokenizer}", *data, *ov]
    pt_summary, wall["pretrain"] = run_job("pretrain", "pretrain", RECIPES["pretrain"], overrides["pretrain"], out_dir)
    return tok_summary, pt_summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    json_path = Path(args.json) if args.json else (RESULTS if args.scale == 1 else out_dir / RESULTS.name)
    total_start = time.perf_counter()
    wall: dict[str, float] = {}
    train_root, test_root, train_n, test_n, data = prepare(out_dir, STAGES, args.scale, args.seed, wall, "bench")
    steps, overrides = {}, {}
    tok_summary, pt_summary = tokenizer_and_pretraining(out_dir, args.scale, data, steps, overrides, wall)

    ov, steps["finetune"] = step_overrides(RECIPES["finetune"], args.scale)
    finetunes = {}
    for stage, init_from, name in (("finetune_pretrained", str(out_dir / "pretrain"), "fmnist_pt_ft"),
                                   ("finetune_scratch", "", "fmnist_scratch_ft")):
        overrides[stage] = [f"run.output_dir={out_dir / stage}", f"run.name={name}", f"finetune.init_from={init_from}",
                            *data, *ov]
        finetunes[stage], wall[stage] = run_job(stage, "finetune", RECIPES["finetune"], overrides[stage], out_dir)
    wall["total"] = time.perf_counter() - total_start

    ft_cfg = resolved_config(out_dir / "finetune_scratch")
    pre, scr = finetunes["finetune_pretrained"], finetunes["finetune_scratch"]
    same = {k: v for k, v in ft_cfg.items() if k not in ("run",)}
    differs = {k for k in same if same[k] != resolved_config(out_dir / "finetune_pretrained")[k]}
    assert differs == {"finetune"}, differs  # only init_from may differ between the two fine-tunings
    result = {
        "benchmark": "fmnist_pretrain_vs_scratch",
        "top1_pretrained": pre["top1"],
        "top1_scratch": scr["top1"],
        "top5_pretrained": pre["top5"],
        "top5_scratch": scr["top5"],
        "top1_gain": pre["top1"] - scr["top1"],
        "pretraining_wins": pre["top1"] > scr["top1"],
        "settings": {
            "scale": args.scale,
            "seed": args.seed,
            "model": ft_cfg["model"]["name"],
            "train_images": train_n,
            "test_images": pre["val_images"],
            "labelled_images": pre["train_images"],
            "train_fraction": ft_cfg["finetune"]["train_fraction"],
            "recipes": RECIPES,
            "steps": steps,
            "finetune": {"optim": ft_cfg["optim"], "finetune": {k: v for k, v in ft_cfg["finetune"].items()
                                                                if k != "init_from"},
                         "drop_path": ft_cfg["model"]["drop_path"], "train": ft_cfg["train"]},
            "overrides": {k: [o.replace(str(out_dir), "<out-dir>") for o in v] for k, v in overrides.items()},
            "cpu_count": os.cpu_count(),
            "versions": versions(),
        },
        "wall_s": {k: round(v, 1) for k, v in wall.items()},
        "tokenizer": {k: tok_summary.get(k) for k in ("tokenizer_codebook_usage", "tokenizer_perplexity",
                                                       "images_per_second")},
        "pretrain": {k: pt_summary.get(k) for k in ("final_loss", "masked_token_accuracy", "majority_token_accuracy",
                                                     "images_per_second")},
        "finetune_pretrained": {k: pre.get(k) for k in ("final_loss", "images_per_second")},
        "finetune_scratch": {k: scr.get(k) for k in ("final_loss", "images_per_second")},
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "pretraining wins" if result["pretraining_wins"] else "pretraining does NOT win"
    print(f"[bench] top-1 on {pre['val_images']} test images: pretrained {pre['top1']:.4f}, "
          f"scratch {scr['top1']:.4f} ({verdict}, {result['top1_gain']:+.4f}); "
          f"wall {wall['total'] / 60:.1f} min; results in {json_path}", flush=True)
    return result


if __name__ == "__main__":
    main()
