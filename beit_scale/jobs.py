"""The registry of training jobs: the one place that names them.

The CLI makes one subcommand per job, the config accepts these names in ``run.job``, the checks validate a
recipe by its job's kind, the pipeline submits a stage with its job's sbatch script, and the launch-script
tests read the same table. A recipe runs under its own command only: a linear-probe recipe given to
``beit-scale finetune`` is refused, never rewritten. Plain Python: nothing heavy is imported here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    name: str  # run.job of the recipes this job reads
    command: str  # `beit-scale <command>`, and a pipeline stage's `job:`
    module: str  # beit_scale.train.<module>.run(cfg) trains it
    script: str  # launch/<script>.sbatch submits it to Slurm
    kind: str  # the recipe's kind, which picks its checks: "tokenizer", "mim", "finetune", "probe"
    # or "segment" (checks.py)
    help: str  # one line for `beit-scale --help`

    def run(self, cfg) -> dict:
        """Run this job on ``cfg`` (already validated); returns its summary."""
        return importlib.import_module(f"beit_scale.train.{self.module}").run(cfg)


JOBS: dict[str, Job] = {job.name: job for job in (
    Job("pretrain", "pretrain", "pretrain", "pretrain", "mim", "masked image modeling (stage 2)"),
    Job("tokenizer", "train-tokenizer", "tokenizer", "tokenizer", "tokenizer",
        "train the image tokenizer, a dVAE or VQ-KD (stage 1)"),
    Job("finetune", "finetune", "finetune", "finetune", "finetune",
        "image classification from pretrained weights, layer-wise lr decay"),
    Job("linprobe", "linprobe", "linprobe", "linprobe", "probe",
        "linear classifier on frozen features of one block"),
    Job("segment", "segment", "segment", "segment", "segment",
        "semantic segmentation (BEiT + UperNet) from pretrained weights, layer-wise lr decay"),
)}
JOB_NAMES = tuple(JOBS)  # the values run.job accepts
BY_COMMAND: dict[str, Job] = {job.command: job for job in JOBS.values()}

# A pipeline stage that is not a training job: ZeRO shards -> one weights file (launch/consolidate.sbatch).
CONSOLIDATE = "consolidate"
STAGE_SCRIPTS: dict[str, str] = {**{job.command: job.script for job in JOBS.values()}, CONSOLIDATE: "consolidate"}


def job_for(command: str, job: str, recipe: str) -> Job:
    """The job ``command`` runs, after checking that ``recipe`` (whose run.job is ``job``) is one of its recipes."""
    runs = BY_COMMAND[command]
    if job != runs.name:
        other = JOBS[job].command if job in JOBS else job
        raise ValueError(f"recipe {recipe!r} is a {job} recipe (run.job={job}); run it with `beit-scale "
                         f"{other}`, or use a {runs.name} recipe")
    return runs
