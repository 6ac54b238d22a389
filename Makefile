# One toolchain, the same locally and in CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv search test test-slow test-all lint format imports bench agent agent-grid clean

# torch first and alone: pip then finds the local CPU build of exactly 2.13.0 instead of pulling
# CUDA packages; constraints.txt keeps every other package at the versions tested here.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,ray]"
	touch $(STAMP)

venv: $(STAMP)

## The default search: python run_search.py --space sparse
search: venv
	$(PY) run_search.py --space sparse

## Tests, without the slow ones (the README's test command; CI runs it).
test: venv
	$(PY) -m pytest -q -m "not slow"

## Only the slow tests (compiles, Ray clusters, agent training); CI runs them after `make test`.
test-slow: venv
	$(PY) -m pytest -q -m slow

## Every test, slow ones included.
test-all: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check attn_search envs tests benchmarks run_search.py
	$(VENV)/bin/ruff format --check attn_search envs tests benchmarks run_search.py
	$(VENV)/bin/mypy

## The package's import graph by layer (tests/test_layout.py checks it points down, without cycles).
imports: venv
	$(PY) tests/test_layout.py

format: venv
	$(VENV)/bin/ruff format attn_search envs tests benchmarks run_search.py
	$(VENV)/bin/ruff check --fix attn_search envs tests benchmarks run_search.py

bench: venv
	$(PY) benchmarks/sparse_vs_dense.py
	$(PY) benchmarks/task_discrimination.py
	$(PY) benchmarks/pruning.py
	$(PY) benchmarks/ray_overhead.py
	$(PY) benchmarks/gpu_packing.py

## The shipped policy (the default of --strategy ppo): the candidate policy meta-trained on every
## family's tables (benchmarks/family_out.py scores the recipe on families it never saw).
# (majority-64 correlates 0.85 with selective_copy-128: not a family of its own, see tables/README.md)
POLICY_TABLES := $(filter-out tables/sparse-smoke.csv tables/majority-64.csv,$(wildcard tables/*.csv))
agent: venv
	$(PY) -m attn_search.cli meta-train --kind policy --tables $(POLICY_TABLES) --steps 4096 \
		--out attn_search/strategies/agents/candidate-ppo.zip

## The grid agent of --strategy ppo-grid, meta-trained on the first four tables.
GRID_TABLES := tables/mqar-128.csv tables/mqar-64.csv tables/selective_copy-128.csv tables/listops-64.csv
agent-grid: venv
	$(PY) -m attn_search.cli meta-train --kind grid --space sparse --tables $(GRID_TABLES) --steps 100000 \
		--out attn_search/strategies/agents/sparse-ppo.zip

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
