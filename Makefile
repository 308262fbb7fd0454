# Two entry points (see README): `make pipeline` runs the pipeline end to end (scripts/pipeline.sh:
# fine-tunes the pretrained stories260K from ../shared and prints what it learned); `make test` runs
# the test suite. Both create .venv from requirements.txt on first use (and again whenever
# requirements.txt changes).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# pip prints one line per package it collects, downloads and installs (and a progress bar on a
# terminal), so the first set-up shows where its minutes go.
PIP := $(VENV)/bin/pip install --disable-pip-version-check

.PHONY: pipeline test test-fast bench-peers

$(VENV)/.installed: requirements.txt
	@echo "== set-up 1/3: creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "== set-up 2/3: installing torch, pinned in requirements.txt (the largest package, hundreds of MB:"
	@echo "   most of the first set-up's minutes are spent here)"
	$(PIP) -c requirements.txt torch
	@echo "== set-up 3/3: installing the other pinned packages of requirements.txt (transformers, peft,"
	@echo "   datasets, bitsandbytes, ...: a few minutes more)"
	$(PIP) -r requirements.txt
	touch $@
	@echo "== set-up done: $(VENV) is ready (rebuilt only when requirements.txt changes)"

pipeline: $(VENV)/.installed
	PY=$(PY) bash scripts/pipeline.sh

# --durations: CI's log names the slowest tests, where its minutes go. Two workers (pytest-xdist), a test file
# per worker (--dist loadfile: a file's module fixtures, such as a trained run its tests share, are built once):
# much of a test's time is a single-threaded subprocess starting up, so the second core would otherwise idle.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# The inner loop while working (not the set-up command): everything but the slow and multi-process tiers.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not multiprocess" tests

# The peers the benchmarks compare against that cannot share .venv (bench/quantize.py's P4b: llmcompressor needs
# transformers <= 5.17), each in its own virtual environment; never part of the test set-up. torch is pinned in the
# requirements file (an unpinned one would pull a CUDA build of several GB).
PEER_VENV := bench/peers/llmcompressor-venv

bench-peers: $(PEER_VENV)/.installed

$(PEER_VENV)/.installed: bench/peers/llmcompressor.txt
	@echo "== bench peers: creating $(PEER_VENV) with $(PYTHON) (llmcompressor, for bench/quantize.py's P4b)"
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --disable-pip-version-check -r bench/peers/llmcompressor.txt
	touch $@
	@echo "== bench peers done: $(PEER_VENV) is ready (rebuilt only when bench/peers/llmcompressor.txt changes)"
