"""The README's quickstart, timed: `beit-scale quickstart` as a user runs it, with the machine it ran on.

Runs ``python -m beit_scale.cli quickstart --config RECIPE`` in a fresh output folder (one process, as the README
does) and writes its summary (accuracies, tokenizer perplexity, images/s, the wall time of each stage) beside the
machine: CPU model, cores, load before the run, torch and DeepSpeed versions.

    python benchmarks/quickstart.py                    # the default recipe, about 8 minutes on 2 idle cores
    python benchmarks/quickstart.py --config small     # the test-sized one, about 2 minutes

Results go to ``benchmarks/results/quickstart_<recipe>.json`` unless ``--json`` says otherwise. Run it on an idle
machine: the numbers are only comparable between quiet runs.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict:
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_avg_1m_before": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "deepspeed": importlib.metadata.version("deepspeed")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="default", help="quickstart recipe (default: default)")
    p.add_argument("--out-dir", default="runs/bench_quickstart", help="the quickstart's output folder (emptied first)")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/results/quickstart_<recipe>.json)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, not a resumed one
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    info = machine()
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "beit_scale.cli", "quickstart", "--config", args.config,
                    "--output-dir", str(out_dir)], cwd=ROOT, env=env, check=True)
    result = {"recipe": args.config, "command": f"beit-scale quickstart --config {args.config}",
              "process_wall_s": round(time.monotonic() - start, 1), "machine": info,
              "summary": json.loads((out_dir / "summary.json").read_text())}
    dest = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"quickstart_{args.config}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(f"quickstart {args.config}: {result['process_wall_s']:.0f} s on {info['cpu']} x{info['cpu_count']} "
          f"(tokenizer {s['wall_s']['tokenizer']:.0f} s, pretraining {s['wall_s']['pretrain']:.0f} s at "
          f"{s['images_per_second']:.0f} img/s); masked-token accuracy {s['masked_token_accuracy']:.3f} vs "
          f"{s['majority_token_accuracy']:.3f}; wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
