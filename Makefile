# `make demo` and `make test` work on a fresh machine with only Python 3.10+ installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch, installed before the project so that its `torch>=2.4` requirement is
# already met and pip does not pull a multi-GB CUDA build. Override on a GPU machine: make venv TORCH=torch
TORCH ?= torch==2.13.0

PEERS_VENV := .venv-peers

.PHONY: venv venv-peers demo test test-slow test-peers test-release lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The peers benchmarks/peers.py and loss_memory.py compare against (TRL, torchtune, Liger-Kernel: the `[peers]`
# extra), in a venv of their own so that their pins never touch the project's (docs/peers.md).
$(PEERS_VENV)/.installed: pyproject.toml
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(PEERS_VENV)/bin/python -m pip install --quiet -e ".[peers]"
	touch $@

venv-peers: $(PEERS_VENV)/.installed

demo: venv
	$(VENV)/bin/distill demo

# Both tiers end with their 15 slowest tests, so a test that grows shows up in every run.
test: venv
	$(PY) -m pytest -m "not slow and not release and not peers" -q --durations=15

test-slow: venv
	$(PY) -m pytest -m "slow and not release and not peers" -q --durations=15

# benchmarks/peers.py at its tiny size with TRL, torchtune and Liger installed (CI runs it; a skip there fails).
test-peers: venv venv-peers
	DISTILL_PEERS_PYTHON=$(PEERS_VENV)/bin/python $(PY) -m pytest -m peers -q --durations=5

# Before a release: the tests too long for CI's budget (docs/testing.md lists them with their last measured time).
test-release: venv
	$(PY) -m pytest -m release -q --durations=15

lint: venv
	$(VENV)/bin/ruff check .
