"""Chains are checked before anything is submitted; the dry run shows the sbatch commands in order."""
import pytest
import yaml

from beit_scale.config import PROJECT_ROOT
from beit_scale.pipeline import load_chain, submit


def chain(tmp_path, stages, **top):
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "stages": stages, **top}))
    return str(path)


def test_the_shipped_chain_links_each_stage_to_the_one_before():
    c = load_chain("large_pt22k")
    assert [s.name for s in c.stages] == ["tokenizer", "pretrain", "consolidate", "ft22k", "ft1k"]
    pretrain, consolidate, ft22k, ft1k = c.stages[1:]
    assert "tokenizer.path=runs/tokenizer_dvae_in1k/tokenizer.safetensors" in pretrain.overrides
    assert consolidate.args == ["runs/pretrain_large_in22k", "runs/pretrain_large_in22k/consolidated/model_fp32.safetensors"]
    assert "finetune.init_from=runs/pretrain_large_in22k/consolidated/model_fp32.safetensors" in ft22k.overrides
    assert "finetune.init_from=runs/finetune_large_pt22k_ft22k" in ft1k.overrides
    assert ft1k.output == PROJECT_ROOT / "runs/finetune_large_pt22k_ft22k_ft1k"  # the scripts run from the root


def test_dry_run_orders_the_stages_with_afterok_dependencies(tmp_path):
    report = submit(load_chain("large_pt22k"), ["--account=abc"], dry_run=True)
    assert [r["status"] for r in report] == ["dry-run"] * 5
    first, second = report[0]["command"], report[1]["command"]
    assert not any(a.startswith("--dependency") for a in first)
    assert "--dependency=afterok:<tokenizer>" in second and "--kill-on-invalid-dep=yes" in second
    assert second[-4:-1] == [str(PROJECT_ROOT / "launch" / "pretrain.sbatch"), "--config", "pretrain_large_in22k"]
    assert all("--account=abc" in r["command"] for r in report)
    assert report[2]["command"][-3].endswith("launch/consolidate.sbatch")


def test_a_done_stage_is_skipped(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    c = load_chain(chain(tmp_path, [{"name": "tok", "job": "train-tokenizer", "config": "quickstart_tokenizer",
                                     "overrides": [f"run.output_dir={out}"]}]))
    assert submit(c, dry_run=True)[0]["status"] == "done"


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "job": "pretrain", "config": "quickstart_pretrain", "overides": []}], "unknown keys"),
    ([{"name": "a", "job": "train"}], "job 'train' must be one of"),
    ([{"name": "a", "job": "pretrain"}], "needs a config"),
    ([{"name": "a", "job": "pretrain", "config": "quickstart_pretrain", "overrides": ["tokenizer.path={b}/t"]}],
     r"\{b\} names no earlier stage"),
    ([{"name": "a", "job": "consolidate", "args": ["x"]}], "takes args"),
    ([{"name": "a", "job": "pretrain", "config": "quickstart_pretrain", "overrides": ["train.nope=1"]}], "nope"),
])
def test_bad_chains_fail_before_any_submission(tmp_path, stages, message):
    with pytest.raises(ValueError, match=message):
        load_chain(chain(tmp_path, stages))


def test_an_unknown_chain_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="shipped: large_pt22k"):
        load_chain("nope")


@pytest.mark.parametrize("top, stage_name", [({"name": "a,b"}, "tok"), ({}, "tok,x"), ({}, "my stage")])
def test_names_that_would_match_other_jobs_in_squeue_are_refused(tmp_path, top, stage_name):
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({"name": "c", **top, "stages": [
        {"name": stage_name, "job": "train-tokenizer", "config": "quickstart_tokenizer"}]}))
    with pytest.raises(ValueError, match=r"may hold only letters, digits and _ \. \+ - \(it becomes a Slurm job name\)"):
        load_chain(str(path))


def test_a_recipe_path_relative_to_here_reaches_the_job_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("base: quickstart_tokenizer\nrun:\n  output_dir: /tmp/x\n")
    monkeypatch.chdir(tmp_path)  # the user's folder, not the project root the job runs from
    c = load_chain(chain(tmp_path, [{"name": "tok", "job": "train-tokenizer", "config": "recipes/mine.yaml"}]))
    assert c.stages[0].command()[:2] == ["--config", str(tmp_path / "recipes" / "mine.yaml")]


def test_dry_run_prints_commands_a_shell_takes_back_unchanged(tmp_path):
    import shlex
    import subprocess
    import sys

    from tests.distributed.ranks import ROOT, rank_env

    path = chain(tmp_path, [{"name": "tok", "job": "train-tokenizer", "config": "quickstart_tokenizer",
                             "overrides": ["run.output_dir=/tmp/a b", "data.root=/data/it's here"]}])
    proc = subprocess.run([sys.executable, "-m", "beit_scale.cli", "pipeline", path, "--dry-run"], cwd=ROOT,
                          env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split("tok: dry-run ", 1)[1].strip()
    assert shlex.split(printed)[-3:] == ["quickstart_tokenizer", "run.output_dir=/tmp/a b", "data.root=/data/it's here"]


@pytest.mark.parametrize("text", ["root:x:0:0:root:/root:/bin/bash\n", "stages: [a, b]\n", "stages: [\n", "- 1\n"])
def test_a_file_that_is_not_a_chain_is_a_message(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"is not a (YAML )?chain"):
        load_chain(str(path))


def test_a_linprobe_stage_runs_the_linprobe_script_and_a_recipe_of_another_job_is_refused(tmp_path):
    c = load_chain(chain(tmp_path, [{"name": "probe", "job": "linprobe", "config": "linprobe_quickstart"}]))
    command = submit(c, dry_run=True)[0]["command"]
    assert command[-3:] == [str(PROJECT_ROOT / "launch" / "linprobe.sbatch"), "--config", "linprobe_quickstart"]
    with pytest.raises(ValueError, match=r"'linprobe_quickstart' is a linprobe recipe \(run\.job=linprobe\); run it "
                                         r"with `beit-scale linprobe`"):
        load_chain(chain(tmp_path, [{"name": "probe", "job": "finetune", "config": "linprobe_quickstart"}]))


@pytest.mark.parametrize("command, recipe, job", [("finetune", "linprobe_quickstart", "linprobe"),
                                                  ("pretrain", "quickstart_tokenizer", "tokenizer"),
                                                  ("train-tokenizer", "quickstart_pretrain", "pretrain")])
def test_a_recipe_under_another_command_is_refused_never_rewritten(command, recipe, job):
    from beit_scale.cli import load_job_config

    with pytest.raises(ValueError, match=rf"is a {job} recipe \(run\.job={job}\)"):
        load_job_config(command, recipe, [])
