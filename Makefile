# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast bench clean gpu-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU build from local disk
	# here; on a GPU machine install the CUDA build of 2.13.0 first (README).
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python launch.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

# On a machine with GPUs: what CPU cannot test (docs/gpu-check.md); without GPUs it says so and exits 0.
gpu-check: setup
	$(BIN)/python scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs multirun outputs
