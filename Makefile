# Two entry points (see README Quickstart):
#   make demo  -- create .venv if missing, then run the main job
#   make test  -- create .venv if missing, then lint and run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs the package and matplotlib (its plot) only.
$(DEMO_STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e ".[demo]"
	touch $(DEMO_STAMP)

# torch (CPU build, first, so the test extra's torch requirement is met by it) is only for the
# transformers parity/export checks in the tests; never a runtime dependency.
$(TEST_STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(TEST_STAMP)

venv: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m jaxrlhf.quickstart

test: $(TEST_STAMP)
	$(BIN)/ruff check jaxrlhf tests configs tools
	$(BIN)/ruff format --check jaxrlhf tests configs tools
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15

# The mutation suite (tools/mutants.txt, docs/testing.md): every curated mutation must be caught.
mutants: $(TEST_STAMP)
	$(BIN)/python tools/mutants.py

mutants-fast: $(TEST_STAMP)
	$(BIN)/python tools/mutants.py --fast

lint: $(TEST_STAMP)
	$(BIN)/ruff check --fix jaxrlhf tests configs tools
	$(BIN)/ruff format jaxrlhf tests configs tools

.PHONY: venv demo test lint mutants mutants-fast
