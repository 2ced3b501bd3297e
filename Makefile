# One command each: `make test` passes the tests, `make demo` runs the main job on the embedded
# default. Both build their own virtual environment (.venv) on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

.PHONY: install test

# The main job on the embedded default (configs/tiny.py). WORKDIR=... to put it elsewhere.
WORKDIR ?= runs/tiny
CONFIG ?= configs/tiny.py
demo: install
	$(PY) -m launch.train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m launch.generate --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m launch.attribute --config=$(CONFIG) --workdir=$(WORKDIR)
	@echo "Results in $(WORKDIR): model/, train/samples_*.png, queries/overview.png, attribution_plus/report.html (AbU+)"

.PHONY: demo
