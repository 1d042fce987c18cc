# Set-up and the two entry points the README opens with. Works on a fresh Debian machine (run as root).
PY ?= python3
VENV ?= .venv
DATASET := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup quickstart test

$(DATASET):
	apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

setup: $(DATASET) $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/beit-scale quickstart

test: setup
	$(VENV)/bin/python -m pytest -q
