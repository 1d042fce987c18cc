"""The job registry is the only list of jobs: the CLI, the config, the checks, the pipeline and the sbatch
scripts all follow it, and a recipe of one job under another job's command is refused."""
import re
import typing

import pytest

from beit_scale import checks, pipeline
from beit_scale.cli import _parser
from beit_scale.config import PROJECT_ROOT, RunConfig, list_recipes, load_config
from beit_scale.jobs import CONSOLIDATE, JOB_NAMES, JOBS, STAGE_SCRIPTS, job_for


def _subcommands() -> set[str]:
    action = next(a for a in _parser()._actions if a.dest == "command")
    return set(action.choices)


def test_every_job_has_a_command_a_run_function_a_kind_with_checks_and_an_sbatch_script():
    assert set(JOBS) == {"pretrain", "tokenizer", "finetune", "linprobe", "segment"}
    for job in JOBS.values():
        assert job.command in _subcommands()
        module = __import__(f"beit_scale.train.{job.module}", fromlist=["run"])
        assert callable(module.run)
        assert job.kind in checks._BY_KIND
        script = (PROJECT_ROOT / "launch" / f"{job.script}.sbatch").read_text()
        # the sbatch script hands its arguments to run.sh under this job's command, nothing else
        assert re.search(rf'exec "\$REPO/launch/slurm/run.sh" {re.escape(job.command)} "\$@"', script), job.name
        assert pipeline.STAGE_SCRIPTS[job.command] == job.script


def test_run_job_accepts_exactly_the_registered_names():
    assert typing.get_args(typing.get_type_hints(RunConfig)["job"]) == JOB_NAMES
    with pytest.raises(ValueError, match=r"run\.job='probe' must be one of 'pretrain', 'tokenizer', 'finetune', "
                                         r"'linprobe', 'segment'"):
        load_config("linprobe_quickstart", ["run.job=probe"])


def test_the_pipeline_knows_the_jobs_and_consolidate_only():
    assert set(STAGE_SCRIPTS) == {job.command for job in JOBS.values()} | {CONSOLIDATE}
    assert all((PROJECT_ROOT / "launch" / f"{s}.sbatch").is_file() for s in STAGE_SCRIPTS.values())


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_shipped_recipe_runs_under_its_jobs_command_and_no_other(recipe):
    job = load_config(recipe).run.job
    assert job_for(JOBS[job].command, job, recipe) is JOBS[job]
    for other in JOBS.values():
        if other.name != job:
            with pytest.raises(ValueError, match=rf"is a {job} recipe \(run\.job={job}\); run it with "
                                                 rf"`beit-scale {JOBS[job].command}`, or use a {other.name} recipe"):
                job_for(other.command, job, recipe)
