"""The one training driver: every job (tokenizer, pretrain, finetune, linprobe) runs through :func:`drive`.

A job supplies a :class:`Task`: its model, its data, the loss of one micro batch, its evaluations and its
output files. The driver does what every run must do the same way: the run folder, the DeepSpeed engine and
schedule, resume, the step loop with gradient accumulation, the skip of a non-finite step, logging,
checkpoints, preemption, the heartbeat, and the summary that every rank returns.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib.metadata
import json
import logging
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
from timm.utils import random_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.files import newest_saved_config
from beit_scale.checkpoint.manager import CheckpointManager
from beit_scale.checkpoint.reshape import needs_universal
from beit_scale.config import Config, dump_yaml, to_dict
from beit_scale.data import make_loader
from beit_scale.engine.core import backward_step, build_engine, engine_dtype
from beit_scale.engine.dist import DistInfo, init_distributed
from beit_scale.engine.ds_config import build_ds_config, write_ds_config
from beit_scale.faults import NoFaults, from_env
from beit_scale.train.control import PREEMPTED_EXIT, Heartbeat, Preempted, StopSignal
from beit_scale.train.metrics import Meter, SampleTrace, Speed, measure_peak_tflops, tensorboard_writer
from beit_scale.train.run_folder import claim_run_folder, refuse_config_change
from beit_scale.train.state import BatchStream, TrainState, capture_rng, restore_rng

log = logging.getLogger(__name__)


class MicroStep(NamedTuple):
    """What a task's micro step hands the driver."""

    loss: torch.Tensor  # 0-dim, on the device: backpropagated, and logged as `loss`
    metrics: dict[str, torch.Tensor]  # more 0-dim values, averaged over each logging window
    keep: Any = None  # given back to Task.step_done once the optimizer step is applied


class Task(abc.ABC):
    """A job, as the driver runs it. Every hook gets the :class:`Run`; the optional ones do nothing here."""

    @abc.abstractmethod
    def build(self, run: "Run") -> tuple[nn.Module, list[dict] | None]:
        """The model to train and its optimizer groups (None: weight-decay groups); called on every rank."""

    @abc.abstractmethod
    def describe(self, run: "Run") -> str:
        """What this run trains, for the log line after the engine starts."""

    @abc.abstractmethod
    def train_set(self, run: "Run") -> Dataset:
        """The training samples: dicts with at least an ``index`` (seeded per sample, see data/seeding.py)."""

    def start(self, run: "Run") -> None:
        """After the engine and the resume, before the first step (e.g. restore an EMA, open the validation set)."""

    def begin_step(self, run: "Run", step: int) -> None:
        """Before the micro batches of optimizer step ``step + 1`` (e.g. a temperature schedule)."""

    @abc.abstractmethod
    def micro_step(self, run: "Run", batch: dict, step: int) -> MicroStep:
        """The loss of one micro batch (the driver runs backward and the optimizer step)."""

    def step_done(self, run: "Run", step: int, kept: list) -> None:
        """Optimizer step ``step`` was applied; ``kept``: each micro step's ``keep``."""

    def log_values(self, run: "Run") -> dict[str, float]:
        """More values for a logging step."""
        return {}

    def after_step(self, run: "Run", step: int) -> None:
        """After step ``step``'s logging, before its checkpoint: periodic evaluations and pictures."""

    def rank_state(self, run: "Run") -> dict:
        """More of this rank's state for each checkpoint (TrainState and the RNGs are always saved)."""
        return {}

    def flops_per_image(self, run: "Run") -> float | None:
        """Model FLOPs of one training step per image (models/flops.py), for TFLOP/s and MFU; None: not reported."""
        return None

    @abc.abstractmethod
    def finish(self, run: "Run", last: dict[str, float]) -> dict:
        """After the last step, on every rank: the final evaluation and output files (rank 0 writes).
        ``last``: the last logged values. Returns this job's summary entries."""


@dataclasses.dataclass
class Run:
    """One run as the task sees it: config, ranks, folder and, once started, the engine and the loop."""

    cfg: Config
    info: DistInfo
    layout: RunLayout
    faults: NoFaults
    engine: Any = None
    schedule: Any = None
    dtype: torch.dtype = torch.float32
    loop: "Loop | None" = None
    compiled: bool = False  # the model runs under torch.compile (engine.compile)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def writer(self):
        """TensorBoard's SummaryWriter on rank 0, else None."""
        return self.loop.writer if self.loop is not None else None


def drive(cfg: Config, task: Task) -> dict:
    """Train ``task`` per ``cfg``; returns the summary that rank 0 also writes to ``summary.json`` (every rank
    returns rank 0's)."""
    faults = from_env()  # a malformed test hook fails here, before any rank starts work
    info = init_distributed()
    random_seed(cfg.run.seed)
    run = Run(cfg, info, claim_run_folder(cfg, info), faults)
    model, groups = task.build(run)
    start_engine(run, model, groups)
    log.info("%s on %d rank(s), %s, ZeRO %d", task.describe(run), info.world_size, run.dtype,
             run.engine.zero_optimization_stage())
    loader = make_loader(task.train_set(run), cfg.train.micro_batch, cfg.data.num_workers, cfg.run.seed, train=True)
    run.loop = loop = start_loop(run, loader, task.flops_per_image(run))
    task.start(run)
    last = train(run, task)
    images_per_second = loop.meter.images_per_second  # the training steps', read before the final evaluation
    speed = ({**loop.meter.speed.of(images_per_second), "flops_per_image": loop.meter.speed.flops_per_image}
             if loop.meter.speed else {})
    waits = loop.meter.data_wait_summary()
    summary = {**task.finish(run, last), "final_loss": last["loss"], "steps": cfg.train.total_steps,
               "images_per_second": images_per_second, **speed, **waits, "world_size": info.world_size,
               "restarts": loop.state.restarts, "skipped_steps": loop.state.skipped_steps}
    if dist.is_initialized():  # rank 0's summary on every rank (some tasks evaluate their output on rank 0)
        shared = [summary]
        dist.broadcast_object_list(shared, src=0)
        summary = shared[0]
    if info.rank == 0:
        run.layout.summary.write_text(json.dumps(summary, indent=2))
        log.info("summary: %s", json.dumps(summary))
    loop.close()
    return summary


def train(run: Run, task: Task) -> dict[str, float]:
    """The step loop, from the resumed step to ``train.total_steps``; returns the last logged values."""
    cfg, engine, loop = run.cfg, run.engine, run.loop
    state, t = loop.state, cfg.train
    last = {"loss": float("nan")}
    engine.train()
    while state.step < t.total_steps:
        step = state.step
        run.schedule.apply(step)
        task.begin_step(run, step)
        micro = []
        for _ in range(t.grad_accum):
            asked = time.perf_counter()
            batch = next(loop.batches)
            loop.meter.data_waited(time.perf_counter() - asked)  # a starved device shows here
            loop.trace.add(step + 1, batch["index"])
            out = task.micro_step(run, batch, step)
            applied = backward_step(engine, run.faults.poison(out.loss, step + 1, run.rank))
            micro.append(out._replace(loss=out.loss.detach()))
        fp16_scale = {"loss_scale": float(engine.optimizer.loss_scale)} if engine.fp16_enabled() else {}
        if not applied:  # DeepSpeed decides at the accumulation boundary, the same on every rank
            skip_nonfinite_step(state, cfg, run.layout, fp16_scale.get("loss_scale"))
            continue
        for out in micro:
            loop.meter.add(loss=out.loss, **out.metrics)
        state.consecutive_skips = 0
        state.step = step + 1
        task.step_done(run, state.step, [out.keep for out in micro])
        loop.meter.step_done()
        if state.step % t.log_every == 0 or state.step == t.total_steps:
            norm = engine.get_global_grad_norm()
            last = loop.meter.flush(step, lr=max(g["lr"] for g in engine.optimizer.param_groups),
                                    grad_norm=float("nan") if norm is None else float(norm), **fp16_scale,
                                    **task.log_values(run))
        task.after_step(run, state.step)
        loop.end_step(engine, lambda: {**checkpoint_payload(state), **task.rank_state(run)})
    return last


def start_engine(run: Run, model: nn.Module, groups: list[dict] | None) -> None:
    """Save the resolved config and ds_config (rank 0) and wrap ``model`` in DeepSpeed (AdamW over ``groups``).

    A newest checkpoint saved by another number of ranks makes the engine load through DeepSpeed's
    universal checkpoint. Sets ``run.engine``, ``run.schedule`` and ``run.dtype``.
    """
    cfg, info, layout = run.cfg, run.info, run.layout
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
    run.engine, run.schedule = build_engine(model, cfg.optim, ds_config, cfg.train.total_steps, groups)
    run.dtype = engine_dtype(run.engine)
    default = torch.cuda.is_available() and run.engine.zero_optimization_stage() <= 2  # ZeRO-3's hooks break graphs
    if cfg.engine.compile if cfg.engine.compile is not None else default:
        run.engine.compile()  # the module only; DeepSpeed's step stays eager
        run.compiled = True
        log.info("the model is compiled with torch.compile (engine.compile; the first steps include compilation)")


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("beit_scale", "torch", "deepspeed", "timm", "torchvision"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def resume_or_start(run: Run) -> tuple[TrainState, CheckpointManager]:
    """The checkpoint manager for this run and the state to start from: the newest complete checkpoint's or step 0."""
    cfg, info, engine, layout = run.cfg, run.info, run.engine, run.layout
    meta = {"config": to_dict(cfg), "world_size": info.world_size, "zero_stage": engine.zero_optimization_stage(),
            "dtype": str(run.dtype).replace("torch.", ""), "versions": versions()}
    c = cfg.checkpoint
    manager = CheckpointManager(layout, c.every_steps, c.keep_last, c.on_damaged, info.rank, info.world_size, meta,
                                universal=engine.load_universal_checkpoint(), faults=run.faults)
    state = TrainState()
    resumed = manager.resume(engine) if c.resume else None
    if resumed is not None:
        refuse_config_change(cfg, resumed.config, layout.checkpoints / resumed.tag)
        saved = resumed.rank_state
        state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        state.restarts += 1
        restore_rng(saved["rng"])
        if not saved["rng_is_own"]:  # a rank the saving run did not have: rank 0's streams, made its own
            random_seed(int(torch.randint(2**31, ())), info.rank)
        log.info("continuing at step %d/%d (epoch %d, after %d of its samples), restart %d",
                 state.step, cfg.train.total_steps, state.epoch, state.samples_in_epoch, state.restarts)
    return state, manager


@dataclasses.dataclass
class Loop:
    """What the step loop reads and writes besides the engine."""

    cfg: Config
    rank: int
    state: TrainState
    checkpoints: CheckpointManager
    batches: BatchStream
    writer: object  # SummaryWriter on rank 0, else None
    meter: Meter
    trace: SampleTrace
    heartbeat: Heartbeat
    stop: StopSignal
    faults: NoFaults

    def end_step(self, engine, payload: Callable[[], dict]) -> None:
        """After optimizer step ``state.step``: checkpoint when due, and on a preemption signal any rank got,
        a checkpoint on every rank, then :class:`Preempted`. ``payload``: the per-rank state to save."""
        step, total = self.state.step, self.cfg.train.total_steps
        self.heartbeat.beat(step)
        self.faults.after_step(step, self.rank, self.stop.signum, engine.module)
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


def start_loop(run: Run, loader: DataLoader, flops_per_image: float | None) -> Loop:
    """Start the watchdog and signal handler, resume (or start at step 0), then open the batch stream,
    TensorBoard, metrics (with TFLOP/s and MFU where the task counts its FLOPs) and sample trace."""
    cfg, info, layout, t = run.cfg, run.info, run.layout, run.cfg.train
    heartbeat = Heartbeat(layout.heartbeat, info.rank, info.world_size, t.heartbeat_timeout, t.stall_timeout)
    stop = StopSignal(t.preempt_signal, t.preempt_check_every, info.device)
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    if restarts:
        log.info("Slurm restart count %s (job %s)", restarts, os.environ.get("SLURM_JOB_ID", "?"))
    state, checkpoints = resume_or_start(run)
    heartbeat.beat(state.step)
    writer = tensorboard_writer(layout.tensorboard, info.rank)
    speed = None
    if flops_per_image:
        peak = cfg.engine.peak_tflops
        if not peak and info.device.type == "cuda":  # a CPU has no peak worth reading MFU against
            peak = measure_peak_tflops(info.device, run.dtype)
            log.info("MFU is read against %.4g TFLOP/s per device, a %s matmul measured here (engine.peak_tflops "
                     "sets it)", peak, run.dtype)
        speed = Speed(flops_per_image, info.world_size, peak)
    meter = Meter(writer, t.total_steps, t.global_batch, state.step, layout.metrics if info.rank == 0 else None,
                  speed)
    trace = SampleTrace(layout.sample_trace(info.rank) if t.trace_samples else None)
    return Loop(cfg, info.rank, state, checkpoints, BatchStream(loader, state), writer, meter, trace, heartbeat, stop,
                run.faults)


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses or gradients (policy ``stop`` or too many skips in a row)."""


def skip_nonfinite_step(state: TrainState, cfg: Config, layout: RunLayout, loss_scale: float | None = None) -> None:
    """Account for an optimizer step that every rank skipped; raise NonFiniteError when the policy says stop.

    The step counter (and so the schedule) does not advance; the skipped micro batches are not reused. In fp16
    (``loss_scale``: DeepSpeed's dynamic scale after the skip) an overflow is also how the scale is found.
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
    scale = f" (fp16 overflow; loss scale now {loss_scale:g})" if loss_scale is not None else ""
    log.warning("non-finite loss or gradient at step %d%s: skipped on every rank (%d in a row, %d in all)",
                step, scale, state.consecutive_skips, state.skipped_steps)


def checkpoint_payload(state: TrainState) -> dict:
    return {**state.to_dict(), "rng": capture_rng()}
