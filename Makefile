PYTHON ?= python3

.PHONY: setup train test test-all bench

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

train: setup
	$(PYTHON) -m launcher --simulate 4 configs/default.toml

test: setup
	$(PYTHON) -m pytest -q

test-all: setup
	$(PYTHON) -m pytest -q -m "slow or not slow"

bench: setup
	$(PYTHON) bench/solver.py
