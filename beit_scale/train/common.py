"""Pieces both training loops share: seeding, the epoch-aware loader, metrics and TensorBoard."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from beit_scale.checkpoint import RunLayout, faults
from beit_scale.checkpoint.files import newest_saved_config
from beit_scale.checkpoint.lock import lock_run_folder
from beit_scale.checkpoint.manager import CheckpointManager
from beit_scale.checkpoint.reshape import needs_universal
from beit_scale.config import Config, changed_fields, dump_yaml, to_dict
from beit_scale.data import ResumableDistributedSampler
from beit_scale.engine.core import build_engine, engine_dtype
from beit_scale.engine.ds_config import build_ds_config, write_ds_config
from beit_scale.train.control import PREEMPTED_EXIT, Heartbeat, Preempted, StopSignal
from beit_scale.train.state import BatchStream, TrainState, capture_rng, restore_rng

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_engine(cfg: Config, model: nn.Module, info, groups: list[dict] | None = None):
    """Make the run folder, save the resolved config and ds_config (rank 0), wrap ``model`` in DeepSpeed
    (AdamW over ``groups``, by default weight-decay groups).

    A newest checkpoint saved by another number of ranks makes the engine load through DeepSpeed's
    universal checkpoint. Returns (layout, engine, schedule, compute dtype).
    """
    layout = claim_run_folder(cfg, info)
    newest = newest_saved_config(layout) if cfg.checkpoint.resume else None
    if newest is not None:  # refused before anything is overwritten; checked again against what resume loads
        ckpt, saved = newest
        refuse_config_change(cfg, saved, ckpt, warn=False)
    ds_config = build_ds_config(cfg, info.world_size)
    if needs_universal(layout, info.world_size, cfg.checkpoint.resume):
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    if info.rank == 0:
        dump_yaml(cfg, layout.config)
        write_ds_config(ds_config, layout.ds_config)
    engine, schedule = build_engine(model, cfg.optim, ds_config, cfg.train.total_steps, groups)
    return layout, engine, schedule, engine_dtype(engine)


_CLAIMED: set[Path] = set()


def claim_run_folder(cfg: Config, info) -> RunLayout:
    """Make the run folder and hold it for this run: rank 0 takes its lock (every rank learns the verdict), then
    with ``checkpoint.start_over`` an earlier run's outputs move to ``before-<time>/``. Once per process."""
    layout = RunLayout(Path(cfg.run.output_dir)).make()
    if layout.root.resolve() in _CLAIMED:
        return layout
    refusal = [lock_run_folder(layout) if info.rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise ValueError(refusal[0])
    if cfg.checkpoint.start_over and layout.previous_outputs():
        if info.rank == 0:
            log.warning("checkpoint.start_over: moved the earlier run's outputs to %s",
                        layout.retire(time.strftime("%Y%m%d-%H%M%S")))
        if dist.is_initialized():
            dist.barrier()  # no rank writes here before the folder is empty
    _CLAIMED.add(layout.root.resolve())
    return layout


def refuse_config_change(cfg: Config, saved: dict, where: Path, warn: bool = True) -> None:
    """A resume must not silently change the run: fields outside SAFE_ON_RESUME and checkpoint.allow_changes
    that differ from the checkpoint's config are refused, naming each with both values."""
    changed = changed_fields(saved, cfg)
    refused = [c for c in changed if c[0] not in cfg.checkpoint.allow_changes]
    if refused:
        names = ",".join(name for name, _, _ in refused)
        raise ValueError(
            f"{where} was saved with another config: "
            + "; ".join(f"{name} {old!r} -> {new!r}" for name, old, new in refused)
            + ". Resuming would change the run silently (a schedule that jumps, other data or targets). Put the "
            f"values back, or allow the change with --allow-config-change {names} (checkpoint.allow_changes), or "
            "start a new run: another run.output_dir, or checkpoint.resume=false checkpoint.start_over=true")
    for name, old, new in changed if warn else ():
        log.warning("resuming with %s changed from %r to %r (checkpoint.allow_changes)", name, old, new)


def make_loader(dataset: Dataset, micro_batch: int, num_workers: int, seed: int, train: bool) -> DataLoader:
    """A loader over this rank's shard; training shards reshuffle per epoch from ``seed`` and can resume mid-epoch."""
    sampler = (ResumableDistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True) if train
               else DistributedSampler(dataset, shuffle=False))
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers are re-forked each epoch so they see the dataset's new epoch
        # Its own generator: creating an iterator must not draw from the global RNG that drop path uses,
        # or a run resumed mid-epoch would diverge. Samples do not depend on it (seeded per sample).
        generator=torch.Generator().manual_seed(seed),
    )


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("beit_scale", "torch", "deepspeed", "timm", "torchvision"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def resume_or_start(cfg: Config, layout: RunLayout, info, engine) -> tuple[TrainState, CheckpointManager]:
    """The checkpoint manager for this run and the state to start from: the newest complete checkpoint's or step 0."""
    meta = {"config": to_dict(cfg), "world_size": info.world_size, "zero_stage": engine.zero_optimization_stage(),
            "dtype": str(engine_dtype(engine)).replace("torch.", ""), "versions": versions()}
    c = cfg.checkpoint
    manager = CheckpointManager(layout, c.every_steps, c.keep_last, c.on_damaged, info.rank, info.world_size, meta,
                                universal=engine.load_universal_checkpoint())
    state = TrainState()
    resumed = manager.resume(engine) if c.resume else None
    if resumed is not None:
        refuse_config_change(cfg, resumed.config, layout.checkpoints / resumed.tag)
        saved = resumed.rank_state
        state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        state.restarts += 1
        restore_rng(saved["rng"])
        if not saved["rng_is_own"]:  # a rank the saving run did not have: rank 0's streams, made its own
            seed_everything(int(torch.randint(2**31, ())) + info.rank)
        log.info("continuing at step %d/%d (epoch %d, after %d of its samples), restart %d",
                 state.step, cfg.train.total_steps, state.epoch, state.samples_in_epoch, state.restarts)
    return state, manager


@dataclasses.dataclass
class Loop:
    """What a training loop reads and writes besides the engine."""

    cfg: Config
    rank: int
    state: TrainState
    checkpoints: CheckpointManager
    batches: BatchStream
    writer: object  # SummaryWriter on rank 0, else None
    meter: "Meter"
    trace: "SampleTrace"
    heartbeat: Heartbeat
    stop: StopSignal

    def end_step(self, engine, payload: Callable[[], dict] | None = None) -> None:
        """After optimizer step ``state.step``: checkpoint when due, and on a preemption signal any rank got,
        a checkpoint on every rank, then :class:`Preempted`. ``payload``: the per-rank state to save
        (default: counters, data position and RNG)."""
        step, total = self.state.step, self.cfg.train.total_steps
        self.heartbeat.beat(step)
        faults.maybe_kill("after_step", step, self.rank)
        faults.maybe_signal(step, self.rank, self.stop.signum)
        faults.maybe_poison_weights(engine.module, step, self.rank)
        payload = payload or (lambda: checkpoint_payload(self.state))
        ckpt = self.checkpoints.save(engine, step, payload()) if self.checkpoints.due(step, total) else None
        if step == total:  # the final evaluation and export are not steps: no stall verdict on them
            self.heartbeat.close()
        if step < total and self.stop.agreed(step):
            ckpt = ckpt or self.checkpoints.save(engine, step, payload())
            log.warning("preempted (%s): checkpoint of step %d/%d committed in %s; exiting with %d so the job "
                        "requeues", self.stop.name, step, total, ckpt, PREEMPTED_EXIT)
            self.close()
            # Every rank leaves with 75 on its own; a launcher that ends the others when the first one exits
            # (srun --kill-on-bad-exit) must not turn their 75 into a SIGTERM status.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Preempted(f"preempted at step {step}")

    def close(self) -> None:
        self.trace.close()
        self.stop.close()
        self.heartbeat.close()
        if self.writer is not None:
            self.writer.close()


def start_loop(cfg: Config, layout: RunLayout, info, engine, loader: DataLoader) -> Loop:
    """Start the watchdog and signal handler, resume (or start at step 0), then open the batch stream,
    TensorBoard, metrics and sample trace."""
    t = cfg.train
    heartbeat = Heartbeat(layout.heartbeat, info.rank, info.world_size, t.heartbeat_timeout, t.stall_timeout)
    stop = StopSignal(t.preempt_signal, t.preempt_check_every, info.device)
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    if restarts:
        log.info("Slurm restart count %s (job %s)", restarts, os.environ.get("SLURM_JOB_ID", "?"))
    state, checkpoints = resume_or_start(cfg, layout, info, engine)
    heartbeat.beat(state.step)
    writer = tensorboard_writer(layout.tensorboard, info.rank)
    meter = Meter(writer, t.total_steps, t.global_batch, state.step, layout.metrics if info.rank == 0 else None)
    trace = SampleTrace(layout.sample_trace(info.rank) if t.trace_samples else None)
    return Loop(cfg, info.rank, state, checkpoints, BatchStream(loader, state), writer, meter, trace, heartbeat, stop)


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses or gradients (policy ``stop`` or too many skips in a row)."""


def skip_nonfinite_step(state: TrainState, cfg: Config, layout: RunLayout) -> None:
    """Account for an optimizer step that every rank skipped; raise NonFiniteError when the policy says stop.

    The step counter (and so the schedule) does not advance; the skipped micro batches are not reused.
    """
    state.skipped_steps += 1
    state.consecutive_skips += 1
    step = state.step + 1
    if cfg.train.on_nonfinite == "stop" or state.consecutive_skips >= cfg.train.max_consecutive_skips:
        latest = layout.latest.read_text().strip() if layout.latest.is_file() else "none"
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} ({state.consecutive_skips} skipped in a row, "
            f"{state.skipped_steps} in all; train.on_nonfinite={cfg.train.on_nonfinite}, "
            f"train.max_consecutive_skips={cfg.train.max_consecutive_skips}); last checkpoint: "
            f"{layout.checkpoints / latest if latest != 'none' else 'none'}"
        )
    log.warning("non-finite loss or gradient at step %d: skipped on every rank (%d in a row, %d in all)",
                step, state.consecutive_skips, state.skipped_steps)


def checkpoint_payload(state: TrainState) -> dict:
    return {**state.to_dict(), "rng": capture_rng()}


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


class Meter:
    """Sums of step metrics kept on the device; read (all-reduced, one host sync) every ``log_every`` steps."""

    def __init__(self, writer, total_steps: int, images_per_step: int, first_step: int = 0,
                 metrics_file: Path | None = None):
        self.writer = writer
        self.metrics_file = metrics_file
        self.total_steps = total_steps
        self.first_step = first_step
        self.images_per_step = images_per_step
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = self.window_start = time.perf_counter()
        self.timed_steps = 0  # steps after the first of this process, which carries start-up costs
        self.timed_start: float | None = None

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def step_done(self) -> None:
        if self.timed_start is None:
            self.timed_start = time.perf_counter()
        else:
            self.timed_steps += 1

    @property
    def images_per_second(self) -> float:
        if not self.timed_steps:
            return float("nan")
        return self.timed_steps * self.images_per_step / (time.perf_counter() - self.timed_start)

    def flush(self, step: int, **extra: float) -> dict[str, float]:
        """All-reduce the window's means across ranks, log them and write them to TensorBoard."""
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in names]) / max(self.count, 1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stacked)
            stacked /= dist.get_world_size()
        now = time.perf_counter()
        values = dict(zip(names, stacked.tolist()))
        values["images_per_s"] = self.count * self.images_per_step / max(now - self.window_start, 1e-9)
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
        self.count = 0
        self.window_start = now
        return values


def tensorboard_writer(folder: Path, rank: int):
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))
