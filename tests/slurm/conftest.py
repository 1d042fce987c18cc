"""The `slurm_cluster` fixture: a real two-node local Slurm (tests/slurm/cluster.sh) for the whole session.

With BEIT_SCALE_SLURM_DIR set (.ci/run does it) the cluster already running there is used and left running;
otherwise one is started in a temporary folder and stopped at the end of the session.
"""
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    folder: Path  # slurm.conf, log/slurmd-n1.log, log/slurmd-n2.log, ...
    env: dict  # os.environ plus SLURM_CONF: sbatch, squeue and scontrol talk to this cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local two-node test cluster (n1, n2), started here unless BEIT_SCALE_SLURM_DIR names a running one."""
    given = os.environ.get("BEIT_SCALE_SLURM_DIR")
    if given:
        folder, started = Path(given), False
    else:
        # Not under pytest's 0700 tmp folders: munged runs as the munge user and must reach its socket.
        folder, started = Path(tempfile.mkdtemp(prefix="beit-slurm-")), True
        proc = subprocess.run(["bash", str(CLUSTER_SH), "start", str(folder)], capture_output=True, text=True,
                              timeout=90)
        if proc.returncode != 0:
            subprocess.run(["bash", str(CLUSTER_SH), "stop", str(folder)], capture_output=True, timeout=90)
            pytest.fail(f"cluster.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    conf = folder / "slurm.conf"
    if not conf.is_file():
        pytest.fail(f"no slurm.conf in {folder}: start the cluster with tests/slurm/cluster.sh start {folder}")
    yield SlurmCluster(folder, dict(os.environ, SLURM_CONF=str(conf)))
    if started:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(folder)], capture_output=True, timeout=90)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """Fashion-MNIST folders and an untrained tokenizer file (its codes are random, which is enough here)."""
    from beit_scale.checkpoint.tokenizer_file import save_tokenizer
    from beit_scale.data import export_fashion_mnist
    from beit_scale.tokenizers import DiscreteVAE, DVAEArch

    root = tmp_path_factory.mktemp("slurm_inputs")
    model = DiscreteVAE(DVAEArch(vocab_size=128, input_size=32, downsample=4, hidden_dim=8, codebook_dim=8))
    save_tokenizer(model, model.state_dict(), root / "tok.safetensors")
    return export_fashion_mnist(root, "train", limit=64), export_fashion_mnist(root, "test", limit=32), root / "tok.safetensors"
