# Set-up and the two entry points the README opens with. Works on a fresh Debian machine (run as root).
PY ?= python3
VENV ?= .venv
DATASET := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Slurm and munge for the local test cluster (tests/slurm/cluster.sh), OpenMPI for mpi4py and the mpirun test,
# python3-venv for the test that installs the package as an unprivileged user with Debian's python3.
SYSTEM_PACKAGES := slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev shellcheck python3-venv
APT_INSTALL := apt-get install -y -q --no-install-recommends

.PHONY: setup quickstart test system-packages

$(DATASET):
	apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

system-packages:
	dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || $(APT_INSTALL) $(SYSTEM_PACKAGES) \
		|| (apt-get update -q && $(APT_INSTALL) $(SYSTEM_PACKAGES))

# mpi4py (the test extra pulls the mpi extra) compiles against libopenmpi-dev.
$(VENV)/.installed: pyproject.toml | system-packages
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

setup: $(DATASET) system-packages $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/beit-scale quickstart

test: setup
	$(VENV)/bin/python -m pytest -q --durations=25
