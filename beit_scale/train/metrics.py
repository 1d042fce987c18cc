"""What a run reports: step metrics (logged, TensorBoard, metrics.jsonl), evaluations and the sample trace."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class SampleTrace:
    """Per-rank JSON lines of the sample ids each step trained on (``train.trace_samples``)."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a") if path is not None else None

    def add(self, step: int, ids: torch.Tensor) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "ids": ids.tolist()}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass(frozen=True)
class Speed:
    """Model FLOPs per image and the device's peak: turns images/s into TFLOP/s and MFU per device."""

    flops_per_image: float  # one training step's FLOPs per image (models/flops.py)
    world_size: int
    peak_tflops: float  # per device; 0 when unknown (no MFU)

    def of(self, images_per_second: float) -> dict[str, float]:
        tflops = images_per_second * self.flops_per_image / self.world_size / 1e12
        return {"tflops": tflops, **({"mfu": tflops / self.peak_tflops} if self.peak_tflops > 0 else {})}


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a large square matmul in ``dtype`` on the GPU ``device``: the reachable peak MFU is read
    against when the recipe names none (engine.peak_tflops); a little under the vendor's figure."""
    n, reps = 8192, 20
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, clocks
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


class Meter:
    """Sums of step metrics kept on the device; read (all-reduced, one host sync) every ``log_every`` steps."""

    def __init__(self, writer, total_steps: int, images_per_step: int, first_step: int = 0,
                 metrics_file: Path | None = None, speed: "Speed | None" = None):
        self.writer = writer
        self.metrics_file = metrics_file
        self.total_steps = total_steps
        self.first_step = first_step
        self.images_per_step = images_per_step
        self.speed = speed
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # micro batches added in this window
        self.window_steps = 0  # optimizer steps in this window
        self.start = self.window_start = time.perf_counter()
        self.timed_steps = 0  # steps after the first of this process, which carries start-up costs
        self.timed_start: float | None = None
        self.wait = 0.0  # seconds this window's micro batches waited for the data loader (this rank)
        self.timed_wait = 0.0  # the same over the timed steps

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def data_waited(self, seconds: float) -> None:
        """A micro batch took ``seconds`` to come out of the loader: near 0 while the workers keep ahead."""
        self.wait += seconds
        if self.timed_start is not None:
            self.timed_wait += seconds

    def step_done(self) -> None:
        self.window_steps += 1
        if self.timed_start is None:
            self.timed_start = time.perf_counter()
        else:
            self.timed_steps += 1

    @property
    def images_per_second(self) -> float:
        if not self.timed_steps:
            return float("nan")
        return self.timed_steps * self.images_per_step / (time.perf_counter() - self.timed_start)

    def data_wait_summary(self) -> dict[str, float]:
        """Over the timed steps: seconds per step waiting for data, and that wait's share of the wall time."""
        if not self.timed_steps:
            return {"data_wait_s": float("nan"), "data_wait_fraction": float("nan")}
        return {"data_wait_s": self.timed_wait / self.timed_steps,
                "data_wait_fraction": self.timed_wait / (time.perf_counter() - self.timed_start)}

    def flush(self, step: int, **extra: float) -> dict[str, float]:
        """All-reduce the window's means across ranks, log them and write them to TensorBoard."""
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in names]) / max(self.count, 1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
        now = time.perf_counter()
        values = dict(zip(names, stacked.tolist()))
        values["images_per_s"] = self.window_steps * self.images_per_step / max(now - self.window_start, 1e-9)
        # this rank's wait for the loader: seconds per step, and the share of the window's wall time
        values["data_wait"] = self.wait / max(self.window_steps, 1)
        values["data_wait_frac"] = self.wait / max(now - self.window_start, 1e-9)
        if self.speed is not None:
            values.update(self.speed.of(values["images_per_s"]))
        values.update(extra)
        done = step + 1
        eta = (now - self.start) / max(done - self.first_step, 1) * (self.total_steps - done)
        text = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        log.info("step %d/%d (%.0f%%) %s | eta %.0fs", done, self.total_steps, 100 * done / self.total_steps, text, eta)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, done)
        if self.metrics_file is not None:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps({"step": done, **values}) + "\n")
        self.sums.clear()
        self.count = self.window_steps = 0
        self.wait = 0.0
        self.window_start = now
        return values


def tensorboard_writer(folder: Path, rank: int):
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def log_eval(results: dict[str, float], step: int, writer, metrics_file: Path | None) -> None:
    """An evaluation's numbers: logged, to TensorBoard (``eval/*``) and to the metrics file."""
    log.info("eval at step %d: %s", step, " ".join(f"{k} {v:.4g}" for k, v in results.items()))
    if writer is not None:
        for k, v in results.items():
            writer.add_scalar(f"eval/{k}", v, step)
    if metrics_file is not None:
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "eval": results}) + "\n")
