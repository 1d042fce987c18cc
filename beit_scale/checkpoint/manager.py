"""Save and resume sharded DeepSpeed checkpoints atomically, with the per-rank state DeepSpeed does not keep.

A save is committed in this order, so a kill at any point leaves the previous checkpoint usable:
engine shards and per-rank state (every rank) -> barrier -> manifest with sizes and sha256 of every file
(written last, atomically) -> latest pointer (atomic replace) -> pruning of older checkpoints.
A checkpoint without a manifest is incomplete and never loaded.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from beit_scale.checkpoint.files import (MANIFEST, ManifestError, atomic_write_text, check_files, committed_tags,
                                         is_tag, meta_file, payload_files, rank_state_file, read_manifest, sha256,
                                         step_of, strangers, tag_of)
from beit_scale.checkpoint.layout import RunLayout
from beit_scale.checkpoint.reshape import GroupSettings, convert, unpartitioned
from beit_scale.checkpoint.safety import check_unpickle_safe
from beit_scale.faults import NoFaults

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be resumed; the message names the files and reasons."""


@dataclass(frozen=True)
class Resumed:
    tag: str
    step: int
    rank_state: dict  # TrainState fields and "rng"
    config: dict  # the resolved config the checkpoint was saved with


def _all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Owns ``<output_dir>/checkpoints``; every method is collective (all ranks call it)."""

    def __init__(self, layout: RunLayout, every_steps: int, keep_last: int, on_damaged: str, rank: int, world: int,
                 meta: dict, universal: bool = False, faults: NoFaults = NoFaults()):
        """``universal``: the engine was built with ``load_universal`` (see :func:`reshape.needs_universal`),
        so checkpoints load through a universal conversion, whatever world size saved them. ``faults``: the
        run's test hooks (:mod:`beit_scale.faults`)."""
        self.root, self.layout = layout.checkpoints, layout
        self.every_steps, self.keep_last, self.on_damaged = every_steps, keep_last, on_damaged
        self.rank, self.world, self.meta, self.universal = rank, world, meta, universal
        self.faults = faults

    # ------------------------------------------------------------------------------------------------ save

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, engine, step: int, rank_state: dict) -> Path:
        """Commit a checkpoint of ``engine`` after optimizer step ``step``."""
        start = time.perf_counter()
        tag = tag_of(step)
        ckpt = self.root / tag
        self.faults.kill("before_files", step, self.rank)
        self._refuse_nonfinite(engine, step)
        if self.rank == 0 and ckpt.exists():  # an incomplete attempt at this step from a killed run
            shutil.rmtree(ckpt)
        _barrier()
        try:
            # Universal-checkpoint info lets ds_to_universal convert ZeRO-2 saves later (other world sizes).
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False,
                                   client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
            path = rank_state_file(ckpt, self.rank)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(rank_state, tmp)
            tmp.replace(path)
            if self.rank == 0:
                atomic_write_text(meta_file(ckpt), json.dumps({**self.meta, "step": step}, indent=2))
            error = None
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError "unexpected pos"
            error = self._write_error(ckpt, err)
        errors = [e for e in _all_gather(error) if e]  # every rank learns it (and waits for the others' files)
        if errors:
            if self.rank == 0:
                shutil.rmtree(ckpt, ignore_errors=True)  # give the space back; it never had a manifest
            raise CheckpointError("; ".join(dict.fromkeys(errors)))
        self.faults.kill("mid_file", step, self.rank, cut=path)
        self.faults.kill("after_shards", step, self.rank)
        _barrier()
        files = payload_files(ckpt)
        mine = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": sha256(p)}
                for i, p in enumerate(files) if i % self.world == self.rank}
        entries = {k: v for part in _all_gather(mine) for k, v in part.items()}
        if self.rank == 0:
            manifest = {"tag": tag, "step": step, "world_size": self.world, "files": entries}
            atomic_write_text(ckpt / MANIFEST, json.dumps(manifest, indent=1))
            self.faults.kill("after_manifest", step, self.rank)
            atomic_write_text(self.layout.latest, tag + "\n")
            self._prune(step)
        _barrier()
        log.info("saved checkpoint %s (%d files, %.1f MB) in %.1fs", ckpt, len(entries),
                 sum(e["size"] for e in entries.values()) / 1e6, time.perf_counter() - start)
        return ckpt

    def _refuse_nonfinite(self, engine, step: int) -> None:
        """Non-finite weights are never committed: the newest checkpoint must be one worth resuming."""
        local = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]  # ZeRO-3: this rank's partition
        checks = [torch.isfinite(t).all() for t in local if t.numel()]
        finite = torch.stack(checks).all().to(torch.int32) if checks else torch.ones((), dtype=torch.int32,
                                                                                     device=local[0].device)
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            committed = committed_tags(self.root)
            raise CheckpointError(f"the weights after step {step} are not finite; no checkpoint of them is written. "
                                  f"The last committed checkpoint is "
                                  f"{self.root / committed[0] if committed else 'none'}; lower optim.lr or check "
                                  "the data, then relaunch from it")

    def _last_size(self) -> int | None:
        """Bytes of the newest committed checkpoint: what the next one will need, about."""
        for tag in committed_tags(self.root):
            try:
                return sum(e["size"] for e in read_manifest(self.root / tag)["files"].values())
            except (ManifestError, TypeError):
                continue
        return None

    def _write_error(self, ckpt: Path, err: Exception) -> str:
        """A message for a failed write: a full file system says so, with the space there is and needed."""
        free, need = shutil.disk_usage(self.root).free, self._last_size()
        full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < max(need or 0, 1 << 20)
        if not full:
            raise err
        needed = f"; a checkpoint of this run takes about {need / 1e6:.1f} MB" if need else ""
        return (f"rank {self.rank}: the file system of {self.root} is full while writing {ckpt.name} "
                f"({free / 1e6:.1f} MB free{needed}). Free space there or move run.output_dir, then relaunch: "
                "the committed checkpoints are intact")

    def _prune(self, newest: int) -> None:
        """Keep ``newest`` (just committed) and the ``keep_last - 1`` committed checkpoints before it.

        A run's checkpoints form one timeline ending at ``newest``: a step folder numbered higher belongs to a
        timeline this run abandoned (a damaged checkpoint it fell back from), so it goes first and can never
        outlive a good one. Incomplete folders older than ``newest`` go too; folders we did not name are left.
        """
        if self.layout.universal.exists():  # a conversion made to resume on another world size is spent
            shutil.rmtree(self.layout.universal, ignore_errors=True)
        committed = committed_tags(self.root)  # includes the one just committed
        for tag in [t for t in committed if step_of(t) > newest]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
            log.warning("removed checkpoint %s: newer than step %d, it belongs to a timeline this run left when it "
                        "fell back from it", tag, newest)
        kept = [t for t in committed if step_of(t) <= newest]
        for tag in kept[self.keep_last:]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
            log.info("pruned checkpoint %s", tag)
        for p in self.root.iterdir():
            if is_tag(p.name) and p.is_dir() and p.name not in committed and step_of(p.name) != newest:
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed incomplete checkpoint %s", p.name)

    # ---------------------------------------------------------------------------------------------- resume

    def resume(self, engine) -> Resumed | None:
        """Load the newest complete, undamaged checkpoint; None when there is none to resume.

        Damaged checkpoints (missing, truncated or altered files) are named on every rank; with
        ``on_damaged='fallback'`` the previous complete one is tried, else this raises. It never returns
        None while a committed checkpoint exists that could not be loaded.
        """
        stray = strangers(self.layout)
        if stray:
            log.warning("ignoring %s in %s: not checkpoint folders this run wrote (step_ and nine digits)", stray,
                        self.root)
        tags = committed_tags(self.root)
        pointer = self.layout.latest.read_text().strip() if self.layout.latest.is_file() else None
        failures = []
        if pointer is not None and pointer not in tags:
            # The pointer is written after the manifest: it names a checkpoint that was complete.
            failures.append(f"{self.layout.latest} names {pointer!r}, which has no manifest now (deleted or damaged)")
            log.error("%s", failures[-1])
            if self.on_damaged == "fail" or not tags:
                raise CheckpointError("no checkpoint can be resumed (checkpoint.on_damaged="
                                      f"{self.on_damaged}):\n  " + "\n  ".join(failures) + "\nTo start over anyway, "
                                      "set checkpoint.resume=false checkpoint.start_over=true")
        if not tags:
            leftovers = [p.name for p in self.root.iterdir() if is_tag(p.name)] if self.root.is_dir() else []
            if leftovers:
                log.warning("no complete checkpoint in %s (only %s); starting from step 0", self.root, leftovers)
            return None
        for tag in tags:
            reason = self._check(tag)
            if reason is None:
                try:
                    resumed, error = self._load(engine, tag), None
                except Exception as err:  # DeepSpeed raises many types for unreadable shards
                    resumed, error = None, f"rank {self.rank}: loading failed: {type(err).__name__}: {err}"
                errors = [e for e in _all_gather(error) if e]  # all ranks agree, so none waits alone
                if not errors:
                    return resumed
                reason = "; ".join(errors)
            failures.append(f"{self.root / tag}: {reason}")
            log.error("checkpoint %s cannot be resumed: %s", self.root / tag, reason)
            if self.on_damaged == "fail":
                break
            if tag != tags[-1]:
                log.warning("falling back to the previous complete checkpoint")
        raise CheckpointError("no checkpoint can be resumed (checkpoint.on_damaged="
                              f"{self.on_damaged}):\n  " + "\n  ".join(failures))

    def _check(self, tag: str) -> str | None:
        """Every rank verifies a share of the files; all ranks get every problem (no rank waits alone)."""
        ckpt = self.root / tag
        try:
            manifest = read_manifest(ckpt)
        except ManifestError as err:
            return str(err)
        if manifest is None:
            return "manifest missing"
        if manifest["world_size"] != self.world and not (self.universal or unpartitioned(ckpt)):
            return (f"saved by {manifest['world_size']} ranks but this run has {self.world} (runs re-partition only "
                    f"when the newest complete checkpoint has another world size): relaunch with "
                    f"{manifest['world_size']} ranks")
        mine = [str(p) for p in check_files(ckpt, manifest["files"], (self.rank, self.world))]
        if not mine:  # intact files: make sure no pickle in this rank's share can run code when DeepSpeed loads it
            share = [ckpt / rel for i, rel in enumerate(sorted(manifest["files"])) if i % self.world == self.rank]
            mine = check_unpickle_safe(share)
        problems = [p for part in _all_gather(mine) for p in part]
        return "; ".join(problems) or None

    def _load(self, engine, tag: str) -> Resumed:
        saved_world = read_manifest(self.root / tag)["world_size"]
        load_root = self.root
        if self.universal:
            error = None
            if self.rank == 0:
                try:
                    convert(self.layout, tag)
                except Exception as err:
                    error = str(err)
            error = _all_gather(error)[0]
            if error:
                raise RuntimeError(error)
            load_root = self.layout.universal
            settings = GroupSettings(engine)
        load_path, _ = engine.load_checkpoint(str(load_root), tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError("DeepSpeed found no checkpoint to load")
        if self.universal:
            settings.restore(engine)
        # Counters and the data position are the same on every rank; RNG streams are per rank, and a rank
        # the saving run did not have starts from rank 0's, re-seeded with its own rank (resume_or_start).
        own = self.rank < saved_world
        state = torch.load(rank_state_file(self.root / tag, self.rank if own else 0), weights_only=True)
        state["rng_is_own"] = own
        config = json.loads(meta_file(self.root / tag).read_text())["config"]
        if "batch_in_epoch" in state:  # saved before the position became a global sample count
            state["samples_in_epoch"] = state.pop("batch_in_epoch") * config["train"]["micro_batch"] * saved_world
        if saved_world != self.world:
            log.info("resumed from %s at step %d, saved by %d ranks, re-partitioned for %d", self.root / tag,
                     step_of(tag), saved_world, self.world)
        else:
            log.info("resumed from %s at step %d", self.root / tag, step_of(tag))
        return Resumed(tag, step_of(tag), state, config)
