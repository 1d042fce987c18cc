"""`beit-scale pipeline CHAIN`: submit a chain of stages to Slurm, each after the previous one succeeded.

A chain is a versioned YAML file (shipped ones in ``beit_scale/recipes/chains/``)::

    name: base_pt22k
    sbatch: ["--time=48:00:00"]            # options for every stage (optional)
    stages:
      - name: tokenizer
        job: train-tokenizer               # pretrain, train-tokenizer, finetune, linprobe, segment or consolidate
        config: tokenizer_dvae_in1k
        overrides: [data.root=/datasets/in1k/train]
        sbatch: ["-N", "4"]                # this stage's own options (optional)
      - name: pretrain
        job: pretrain
        config: pretrain_base_in22k
        overrides: ["tokenizer.path={tokenizer}/tokenizer.safetensors"]
      - name: consolidate
        job: consolidate
        args: ["{pretrain}", "{pretrain}/consolidated.safetensors"]
      ...

``{stage}`` stands for that stage's ``run.output_dir`` (a consolidate stage: the folder of its output).
Stages run in the listed order: each is submitted with ``--dependency=afterok:<previous>`` and
``--kill-on-invalid-dep=yes``, so a failed stage cancels every stage after it. Submitting the chain again
skips the stages already done (their run folder has ``summary.json``; a consolidate stage, its output file)
and waits on, rather than duplicates, a stage still queued or running under the same job name.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from beit_scale.checkpoint import RunLayout
from beit_scale.config import PROJECT_ROOT, load_config, resolve_project_path
from beit_scale.jobs import CONSOLIDATE, STAGE_SCRIPTS, job_for

log = logging.getLogger(__name__)

_STAGE_KEYS = {"name", "job", "config", "overrides", "args", "sbatch"}


@dataclass
class Stage:
    name: str
    job: str
    config: str = ""
    overrides: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)
    output: Path | None = None  # run folder, or the consolidated file

    @property
    def done(self) -> bool:
        if self.job == CONSOLIDATE:
            return self.output.is_file()
        return RunLayout(self.output).summary.is_file()

    def command(self) -> list[str]:
        """The launch script's arguments after its name."""
        if self.job == CONSOLIDATE:
            return self.args
        return ["--config", self.config, *self.overrides]


@dataclass
class Chain:
    name: str
    stages: list[Stage]
    sbatch: list[str]


def _fill(text: str, outputs: dict[str, Path], where: str) -> str:
    def sub(match):
        key = match.group(1)
        if key not in outputs:
            raise ValueError(f"{where}: {{{key}}} names no earlier stage (earlier: {', '.join(outputs) or 'none'})")
        return str(outputs[key])

    return re.sub(r"\{([A-Za-z0-9_-]+)\}", sub, text)


def _from_root(path: str) -> Path:
    """Where a job's relative path lands: the launch scripts run every stage from the project root."""
    return Path(path) if Path(path).is_absolute() else PROJECT_ROOT / path


def load_chain(path_or_name: str) -> Chain:
    """Read and check a chain: known keys, known jobs, loadable recipes, references to earlier stages only."""
    path = Path(path_or_name)
    if not path.is_file():
        path = resolve_project_path(f"beit_scale/recipes/chains/{path_or_name}.yaml")
    if not path.is_file():
        shipped = sorted(p.stem for p in (PROJECT_ROOT / "beit_scale" / "recipes" / "chains").glob("*.yaml"))
        raise ValueError(f"chain {path_or_name!r}: no such file or shipped chain (shipped: {', '.join(shipped)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a YAML chain: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(raw, dict) or not all(isinstance(e, dict) for e in raw.get("stages") or []):
        raise ValueError(f"{path} is not a chain: a YAML mapping with name, sbatch and stages (a list of mappings)")
    unknown = set(raw) - {"name", "stages", "sbatch"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a chain has name, sbatch and stages")
    if not raw.get("stages"):
        raise ValueError(f"{path}: no stages")
    outputs: dict[str, Path] = {}
    stages = []
    for i, entry in enumerate(raw["stages"]):
        where = f"{path}: stage {i + 1} ({entry.get('name', '?')})"
        bad = set(entry) - _STAGE_KEYS
        if bad:
            raise ValueError(f"{where}: unknown keys {sorted(bad)}; allowed: {sorted(_STAGE_KEYS)}")
        if entry.get("job") not in STAGE_SCRIPTS:
            raise ValueError(f"{where}: job {entry.get('job')!r} must be one of {', '.join(STAGE_SCRIPTS)}")
        name = _job_name_part(str(entry.get("name") or entry["job"]), f"{where}: name")
        if name in outputs:
            raise ValueError(f"{where}: a stage named {name!r} comes earlier; stage names must be unique")
        stage = Stage(name, entry["job"], str(entry.get("config", "")),
                      [_fill(str(o), outputs, where) for o in entry.get("overrides", [])],
                      [_fill(str(a), outputs, where) for a in entry.get("args", [])],
                      [str(s) for s in entry.get("sbatch", [])])
        if stage.job == CONSOLIDATE:
            if len(stage.args) != 2:
                raise ValueError(f"{where}: a consolidate stage takes args [CHECKPOINT_OR_RUN, OUT.safetensors]")
            stage.output = _from_root(stage.args[1])
            outputs[name] = Path(stage.args[1]).parent
        else:
            if not stage.config:
                raise ValueError(f"{where}: a {stage.job} stage needs a config (recipe name or YAML path)")
            cfg = load_config(stage.config, stage.overrides)  # unknown keys and bad values fail here
            job_for(stage.job, cfg.run.job, stage.config)
            if Path(stage.config).is_file():  # a path from here; the job runs from the project root
                stage.config = str(Path(stage.config).resolve())
            stage.output = _from_root(cfg.run.output_dir)
            outputs[name] = Path(cfg.run.output_dir)
        stages.append(stage)
    name = _job_name_part(str(raw.get("name") or path.stem), f"{path}: name")
    return Chain(name, stages, [str(s) for s in raw.get("sbatch", [])])


def _job_name_part(name: str, where: str) -> str:
    """Chain and stage names make the Slurm job name that finds a queued stage again (``squeue -n`` splits a
    comma into two names), so they are plain words."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ValueError(f"{where} {name!r} may hold only letters, digits and _ . + - (it becomes a Slurm job name)")
    return name


def _queued(job_name: str, env: dict) -> str | None:
    """Id of a pending or running job of ours with this name, if any (none where Slurm is not installed)."""
    try:
        out = subprocess.run(["squeue", "-h", "--me", "-n", job_name, "-t", "PENDING,RUNNING,REQUEUED", "-o", "%i"],
                             capture_output=True, text=True, env=env, timeout=60)
    except FileNotFoundError:
        log.warning("squeue not found: cannot see which stages are already queued")
        return None
    if out.returncode != 0:
        log.warning("squeue failed (%s): cannot see which stages are already queued", out.stderr.strip()[:200])
        return None
    ids = out.stdout.split()
    return ids[-1] if ids else None


def submit(chain: Chain, extra_sbatch: list[str] = (), dry_run: bool = False) -> list[dict]:
    """Submit the stages not yet done; returns one record per stage (status, job id, command)."""
    env = dict(os.environ)
    previous: str | None = None
    report = []
    for stage in chain.stages:
        job_name = f"{chain.name}.{stage.name}"
        if stage.done:
            log.info("stage %s: done (%s), skipped", stage.name, stage.output)
            report.append({"stage": stage.name, "status": "done", "output": str(stage.output)})
            continue
        running = _queued(job_name, env)  # a dry run shows what a real submission would do, queue included
        if running:
            log.info("stage %s: already queued or running as job %s", stage.name, running)
            report.append({"stage": stage.name, "status": "queued", "job": running})
            previous = running
            continue
        script = PROJECT_ROOT / "launch" / f"{STAGE_SCRIPTS[stage.job]}.sbatch"
        dependency = [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"] if previous else []
        cmd = ["sbatch", "--parsable", f"--job-name={job_name}", *dependency, *chain.sbatch, *stage.sbatch,
               *extra_sbatch, str(script), *stage.command()]
        if dry_run:
            log.info("stage %s: would run %s", stage.name, shlex.join(cmd))
            report.append({"stage": stage.name, "status": "dry-run", "command": cmd})
            previous = f"<{stage.name}>"
            continue
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch refused stage {stage.name}: {proc.stderr.strip()}\n  {shlex.join(cmd)}")
        previous = proc.stdout.strip().split(";")[0]
        log.info("stage %s: submitted job %s%s", stage.name, previous,
                 f" after {dependency[0].split(':', 1)[1]}" if dependency else "")
        report.append({"stage": stage.name, "status": "submitted", "job": previous, "command": cmd})
    return report
