# Atrius: `make demo` and `make test` set up everything on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy schemas

test: lint
	$(BIN)/pytest -q -ra --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/atrius demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/delta.py $(BENCH_ARGS)
	$(BIN)/python bench/history.py $(BENCH_ARGS)
	$(BIN)/python bench/ui.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
