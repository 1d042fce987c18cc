"""Where a run's files live. The only module that spells paths inside a run's output folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


_RETIRED = "before-"  # earlier runs' outputs, moved aside by checkpoint.start_over


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def lock(self) -> Path:
        """Held by rank 0 of the run using this folder (see :mod:`beit_scale.checkpoint.lock`)."""
        return self.root / "run.lock"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def visualize(self) -> Path:
        """Pictures `beit-scale visualize` writes by default: masks, reconstructions, predictions, attention."""
        return self.images / "visualize"

    @property
    def tokenizer(self) -> Path:
        """The trained tokenizer that `train-tokenizer` writes and a pretraining recipe points at."""
        return self.root / "tokenizer.safetensors"

    @property
    def model(self) -> Path:
        """Final consolidated weights of the trained model."""
        return self.root / "model.safetensors"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        """Sharded DeepSpeed checkpoints, one folder per saved step."""
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        """Pointer file naming the latest committed checkpoint; replaced atomically."""
        return self.checkpoints / "latest_committed"

    @property
    def universal(self) -> Path:
        """Universal (world-size independent) conversions of checkpoints, one folder per step, made on demand."""
        return self.checkpoints / "universal"

    @property
    def metrics(self) -> Path:
        """One JSON line per logged step (rank 0)."""
        return self.root / "metrics.jsonl"

    def heartbeat(self, rank: int) -> Path:
        """Each rank's last sign of life and finished step (read by the watchdog and `beit-scale heartbeat`)."""
        return self.root / "heartbeat" / f"rank{rank:05d}.json"

    def heartbeats(self) -> list[Path]:
        return sorted((self.root / "heartbeat").glob("rank*.json"))

    def sample_trace(self, rank: int) -> Path:
        """Sample ids each rank trained on, per step (only with train.trace_samples)."""
        return self.root / f"samples_rank{rank:05d}.jsonl"

    def previous_outputs(self) -> list[Path]:
        """What an earlier run left here (checkpoints, metrics, weights, logs); earlier retired runs excluded."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if not p.name.startswith(_RETIRED) and p != self.lock)

    def retire(self, stamp: str) -> Path:
        """Move :meth:`previous_outputs` into ``before-<stamp>/`` so that a new run starts on an empty folder."""
        dest = self.root / f"{_RETIRED}{stamp}"
        dest.mkdir()
        for p in self.previous_outputs():
            p.rename(dest / p.name)
        return dest

    def make(self) -> "RunLayout":
        self.root.mkdir(parents=True, exist_ok=True)
        return self
