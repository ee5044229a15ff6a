PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PROTOS := $(wildcard protos/llmesh/v1/*.proto)
GEN := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))

.PHONY: install test bench clean protos

install: $(STAMP) protos

# Generated code lives in llmesh/v1/ (git-ignored), rebuilt whenever a .proto changes.
protos: $(GEN)
$(GEN) &: $(PROTOS) $(STAMP)
	mkdir -p llmesh/v1
	touch llmesh/__init__.py llmesh/v1/__init__.py
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

# The CPU build of torch is installed first, by exact version, so nothing later
# can pull the multi-GB CUDA build; the project's pin (torch==2.13.0) keeps it.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	mkdir -p llmesh/v1 && touch llmesh/__init__.py llmesh/v1/__init__.py
	$(BIN)/pip install -q -e '.[test,bench]'
	# structured output: xgrammar without its triton requirement (1 GB of GPU kernel
	# compiler xgrammar never runs on a CPU; GPU images have it with torch); its other
	# requirements are in pyproject.toml
	$(BIN)/pip install -q --no-deps 'xgrammar==0.2.8'
	# the Envoy API messages of the xDS control plane (mesh/xds.py), in a folder of their
	# own: xds-protos carries its own copies of opentelemetry-proto, googleapis-common-protos
	# and envoy/__init__.py, which would overwrite those packages in site-packages
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/xds-protos 'xds-protos==1.85.0'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/llmesh bench offline --config benchmarks/tracing-off.yaml --num-requests 256 --targets engine,mesh,hf-static,hf-cb --json benchmarks/results/offline-all.json

clean:
	rm -rf $(VENV) build *.egg-info llmesh
