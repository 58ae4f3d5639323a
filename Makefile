# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both set everything up on a fresh machine first.
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
VENV := .venv/bin

.PHONY: setup demo test test-slow test-all lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/mergeforge demo

test: setup
	$(VENV)/python -m pytest -m "not slow"

# The slow tests (end-to-end CLI merges of every data-free method); CI runs them after `make test`.
test-slow: setup
	$(VENV)/python -m pytest -m slow

test-all: setup
	$(VENV)/python -m pytest

lint: setup
	$(VENV)/ruff check src tests $(wildcard benchmarks examples)
	$(VENV)/mypy

bench: setup
	$(VENV)/python benchmarks/speed.py
