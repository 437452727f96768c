# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
HOME_DIR ?= .tiermesh
STAMP   := $(VENV)/.installed

.PHONY: demo test install variants up down status bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[build,convert,litert,dev,bench]"
	touch $(STAMP)

install: $(STAMP)

variants: install
	$(BIN)/mesh --home $(HOME_DIR) build

demo: variants
	$(BIN)/mesh --home $(HOME_DIR) demo --topology topologies/local.yaml

test: variants
	TIERMESH_HOME=$(abspath $(HOME_DIR)) $(BIN)/python -m pytest -q

up: variants
	$(BIN)/mesh --home $(HOME_DIR) up topologies/local.yaml

down:
	$(BIN)/mesh --home $(HOME_DIR) down

status:
	$(BIN)/mesh --home $(HOME_DIR) status

# Each benchmark writes benchmarks/results/<name>.json; run them on a quiet machine.
BENCHMARKS := planner variants overhead batching prediction overload frozen_entry fuzz limits placement profile_path autoscale chaos security tenants
bench: variants
	for b in $(BENCHMARKS); do TIERMESH_HOME=$(abspath $(HOME_DIR)) $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	-$(BIN)/mesh --home $(HOME_DIR) down
	rm -rf $(HOME_DIR) .pytest_cache
