# Two entry points (see README Quickstart):
#   make demo  -- create .venv if missing, then run the main job
#   make test  -- create .venv if missing, then lint and run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# torch (CPU) is only for the transformers parity/export checks in the tests; never a runtime dependency.
	$(BIN)/pip install -q torch==2.13.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jaxrlhf.quickstart

test: $(STAMP)
	$(BIN)/ruff check jaxrlhf tests configs
	$(BIN)/ruff format --check jaxrlhf tests configs
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15

lint: $(STAMP)
	$(BIN)/ruff check --fix jaxrlhf tests configs
	$(BIN)/ruff format jaxrlhf tests configs

.PHONY: venv demo test lint
