# One command sets up a fresh machine (`make setup`), one runs the tests (`make test`),
# one runs the demo on a built-in dataset (`make demo`).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data

.PHONY: setup venv system-deps test demo gpu-check gpu-wheels clean

setup: venv system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	# torch/torchvision come from the machine's local wheel store (pinned, never resolved from PyPI)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'

system-deps:
	bash scripts/system-deps.sh

test: setup
	$(BIN)/python -m pytest -q tests

demo: setup
	bash scripts/demo.sh

# on a machine with one NVIDIA GPU, no network: wheels carried in wheels/gpu (make gpu-wheels)
gpu-check:
	bash benchmarks/gpu_check.sh

gpu-wheels:
	bash scripts/gpu-wheels.sh

clean:
	rm -rf $(VENV) $(DATA) runs
