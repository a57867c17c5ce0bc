# llmesh: `make run` starts the mesh, `make test` runs the suite. Both set up
# everything first: virtualenv, dependencies, generated code, the model.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BUF := $(VENV)/bin/buf
STAMP := $(VENV)/.installed
GEN_STAMP := gen/.stamp
PATHS_STAMP := $(VENV)/.paths
PROTOS := $(shell find protos -name '*.proto')
NODES ?= 1
# `make run REPLICAS=2 DB=postgres`: two replicas each of the orchestrator, policy, tools and store, the
# store on a throw-away PostgreSQL cluster. REPLICAS=1 DB=sqlite is the one-process-per-service default.
REPLICAS ?= 1
DB ?= sqlite
PYTEST_ARGS ?=
# llama.cpp is compiled once; pip keeps the wheel in its cache afterwards.
LLAMA_CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

.PHONY: setup run test test-tls gen model system-deps lint typecheck lint-protos proto-image bench clean
# Each mk/<name>.mk adds its bench-* targets to this list.
BENCHES :=

setup: $(STAMP) $(PATHS_STAMP) $(GEN_STAMP) model

# llmesh installs editable (services/ on the path).
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --progress-bar off -r requirements.txt
	touch $@

# One .pth file puts the repository root (tests/ and bench/, which benchmarks
# and test subprocesses import) and gen/ (the generated llmesh.* modules) on the
# path of every interpreter of the venv, whatever its cwd, so scripts and test
# subprocesses set no sys.path or PYTHONPATH. Rewritten when this Makefile
# changes, so older venvs follow (their llmesh-gen.pth, gen/ alone, goes).
$(PATHS_STAMP): $(STAMP) Makefile
	@purelib="$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
	printf '%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$purelib/llmesh-paths.pth"; \
	rm -f "$$purelib/llmesh-gen.pth"
	touch $@

gen: $(GEN_STAMP)
$(GEN_STAMP): $(STAMP) $(PROTOS) scripts/gen_protos.py | $(PATHS_STAMP)
	$(PY) scripts/gen_protos.py
	touch $@

model: $(STAMP)
	@$(PY) -m services.gemma.model_cache >/dev/null

# PostgreSQL server (store tests, `make run DB=postgres`), bubblewrap (tool
# sandbox) and Node.js with npm (the generated-stub client test), when missing.
system-deps:
	@bash scripts/system_deps.sh

# Python lint (ruff; rules and per-file ignores in pyproject.toml).
lint: $(STAMP)
	$(PY) -m ruff check services tests bench scripts

# Static types of services/ (mypy; settings in pyproject.toml). Needs the
# generated code: protoc's .pyi stubs type the llmesh.* messages.
typecheck: $(GEN_STAMP)
	$(PY) -m mypy

lint-protos: $(GEN_STAMP)
	$(BUF) lint
	$(BUF) breaking protos --against descriptors/llmesh-v1.binpb

# Deliberate only: rewrites the committed v1 image that `buf breaking` guards.
proto-image: $(GEN_STAMP)
	$(BUF) build protos -o descriptors/llmesh-v1.binpb

# checkov (the manifests' security scan in tests/deploy/test_manifests.py)
# pins packaging<24 while pytest needs >=24: it gets a venv of its own.
CHECKOV_VENV := $(VENV)/checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
$(CHECKOV_STAMP): deploy/checkov-requirements.txt
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --progress-bar off -r deploy/checkov-requirements.txt
	touch $@

test: setup system-deps lint typecheck lint-protos $(CHECKOV_STAMP)
	LLMESH_CHECKOV=$(abspath $(CHECKOV_VENV))/bin/checkov $(PY) -m pytest $(PYTEST_ARGS)

# The same suite with mutual TLS on every server and client of the tests.
test-tls: setup system-deps $(CHECKOV_STAMP)
	LLMESH_TEST_TLS=1 LLMESH_CHECKOV=$(abspath $(CHECKOV_VENV))/bin/checkov $(PY) -m pytest $(PYTEST_ARGS)

# DB=postgres needs the PostgreSQL server: installed as for the tests.
run: setup $(if $(filter postgres,$(DB)),system-deps)
	$(PY) -m services.launcher --nodes $(NODES) --replicas $(REPLICAS) --db $(DB)

clean:
	rm -rf gen build .pytest_cache

# Each component adds its own targets (bench-*, migrations) here.
-include mk/*.mk

# `make bench` runs every benchmark the mk/*.mk files add to BENCHES (each
# defines bench-<name> at least); results land in bench/results/*.json, and it
# ends with bench/results/report.html + report.png.
BENCHES += $(patsubst mk/%.mk,bench-%,$(wildcard mk/*.mk))
bench: $(sort $(BENCHES))
	@$(MAKE) --no-print-directory bench-report
