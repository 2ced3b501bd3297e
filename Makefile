# One command each: `make test` passes the tests, `make demo` runs the main job on the embedded
# default. Both build their own virtual environment (.venv) on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# The package alone (what the demo needs), then the test extra (torch, transformers) on top.
$(VENV)/.installed-run: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-run
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

.PHONY: install test

# The main job on the embedded default: `make demo` runs the shrunk recipe (configs/tiny.py:demo,
# minutes); `make demo-full` the default recipe (configs/tiny.py). WORKDIR=... to put it elsewhere.
CONFIG ?= configs/tiny.py:demo
WORKDIR ?= runs/tiny-demo
demo: $(VENV)/.installed-run
	$(PY) -m launch.train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m launch.generate --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) -m launch.attribute --config=$(CONFIG) --workdir=$(WORKDIR)
	@echo "Results in $(WORKDIR): model/, train/samples_*.png, queries/overview.png, attribution_plus/report.html (AbU+)"

demo-full:
	$(MAKE) demo CONFIG=configs/tiny.py WORKDIR=runs/tiny

.PHONY: demo demo-full
