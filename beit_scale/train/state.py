"""What a run must carry across a restart besides the engine: counters, data position and RNG states."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current pass over the data
    samples_in_epoch: int = 0  # samples all ranks together consumed in `epoch` (independent of the world size)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_skips: int = 0  # skipped steps since the last applied one
    restarts: int = 0  # times this run was resumed from a checkpoint

    def to_dict(self) -> dict:
        return asdict(self)


def capture_rng() -> dict:
    """This process's RNG states (torch, CUDA, numpy, python) in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class BatchStream:
    """Micro batches forever, keeping ``state.epoch``/``state.samples_in_epoch`` equal to what was consumed.

    Restarting from a saved state positions the sampler so the remaining samples of the epoch come next,
    on any number of ranks that can split them evenly (checked here, before any training).
    """

    def __init__(self, loader: DataLoader, state: TrainState):
        if len(loader.sampler) < loader.batch_size:
            raise ValueError(
                f"the training set gives no full batch per rank ({len(loader.dataset)} images, "
                f"micro batch {loader.batch_size}); lower train.micro_batch or add images"
            )
        loader.sampler.check_position(state.epoch, state.samples_in_epoch)
        self.loader, self.state, self._it = loader, state, None
        self.samples_per_batch = loader.batch_size * loader.sampler.num_replicas

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self.loader.sampler.set_position(self.state.epoch, self.state.samples_in_epoch)
                if hasattr(self.loader.dataset, "set_epoch"):
                    self.loader.dataset.set_epoch(self.state.epoch)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.state.epoch += 1
                self.state.samples_in_epoch = 0
                continue
            self.state.samples_in_epoch += self.samples_per_batch
            return batch
