# `make demo` and `make test` work on a fresh machine with only Python 3.10+ installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch, installed before the project so that its `torch>=2.4` requirement is
# already met and pip does not pull a multi-GB CUDA build. Override on a GPU machine: make venv TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-slow test-release lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/distill demo

# Both tiers end with their 15 slowest tests, so a test that grows shows up in every run.
test: venv
	$(PY) -m pytest -m "not slow and not release" -q --durations=15

test-slow: venv
	$(PY) -m pytest -m "slow and not release" -q --durations=15

# Before a release: the tests too long for CI's budget (docs/testing.md lists them with their last measured time).
test-release: venv
	$(PY) -m pytest -m release -q --durations=15

lint: venv
	$(VENV)/bin/ruff check .
