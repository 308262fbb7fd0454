# Two entry points (see README): `make pipeline` runs the pipeline end to end on a small locally built
# model; `make test` runs the test suite. Both create .venv from requirements.txt on first use (and
# again whenever requirements.txt changes).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: pipeline test

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

pipeline: $(VENV)/.installed
	PY=$(PY) bash scripts/pipeline.sh

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
