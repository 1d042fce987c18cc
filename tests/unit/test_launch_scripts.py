"""Every launch script passes shellcheck (installed by `make setup`; missing is a failure, not a skip)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from beit_scale.jobs import JOBS

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*ROOT.glob("launch/**/*.sh"), *ROOT.glob("launch/*.sbatch"), ROOT / "tests/slurm/cluster.sh",
                  ROOT / ".ci/run"])


def test_the_launch_folder_has_the_slurm_scripts():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"launch/local.sh", "launch/slurm/run.sh", "launch/slurm/topology.sh", "launch/pretrain.sbatch",
            "launch/tokenizer.sbatch", "launch/finetune.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_passes_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: run `make setup` (apt-get install shellcheck)"
    proc = subprocess.run([shellcheck, "-x", str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", sorted({job.script for job in JOBS.values()}))
def test_sbatch_scripts_request_requeue_and_a_signal_the_ranks_receive(script):
    text = (ROOT / "launch" / f"{script}.sbatch").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=USR2@180"):
        assert line in text  # no B: in --signal, so srun's tasks (the ranks) get USR2, not the batch shell
    assert "--config" not in text.split("set -euo pipefail")[1]  # hyperparameters stay in the recipe
