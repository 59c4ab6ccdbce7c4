# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned: this exact CPU build lies on the build machines' disk; a newer one pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test test-mutations lint bench clean

# Beside the extras: the real-server tests' tritonserver, the nvidia-pytriton wheel, comes without its
# dependencies (it declares numpy<2, under which its stub dies serving us: docs/triton.md, serve on a CPU
# machine); perf_analyzer for `python -m bench --only serve` is the last build for glibc 2.35, in tritonclient
# 2.51's wheel (PyPI's perf-analyzer wheels need glibc 2.38), put in a folder of its own so the client stays new.
# PYTHONWARNINGS: setuptools' "Editable installation" notice is information only (the checkout is meant to be importable).
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/pip install -q -e '.[export,ort,train,dev,serve]'
	$(BIN)/pip install -q --no-deps 'nvidia-pytriton==0.7.0'
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/perf-analyzer 'tritonclient==2.51.0'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m imagefolder.cli.demo

# loadgroup: the tests of one real Triton server (xdist_group) run on one worker, in file order
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15

# Realistic one-line mistakes in the TensorRT path, each run against the tests that must catch it (tests/mutations.py;
# about 5 minutes on 2 cores, so not part of `make test`).
test-mutations: $(STAMP)
	$(BIN)/python -m tests.mutations

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The benchmark suite on the official d17 architecture (random weights), ≤ 20 minutes on 2 cores: tables into
# docs/benchmarks.md's generated section, figures and raw numbers into docs/bench/ (python -m bench -h: options).
bench: $(STAMP)
	$(BIN)/python -m bench --write-docs

clean:
	rm -rf $(VENV) build *.egg-info demo-out
