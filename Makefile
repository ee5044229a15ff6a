PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test bench clean

install: $(STAMP)

# The CPU build of torch is installed first, by exact version, so nothing later
# can pull the multi-GB CUDA build; the project's pin (torch==2.13.0) keeps it.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/llmesh bench offline --num-requests 256 --targets engine,hf-static,hf-cb --json benchmarks/results/offline.json

clean:
	rm -rf $(VENV) build *.egg-info
