# batchwire: `make serve` runs the main job, `make test` runs the tests (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_REPOSITORY ?= model_repository
PORT ?= 8001
HOST ?= 127.0.0.1
PROTOS := protos/model_config.proto protos/grpc_service.proto

.PHONY: venv serve train test protos lint typecheck perf-analyzer clean

# The environment: a venv with the project and its dev extra (torch==2.13.0 CPU build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Train the default model if the repository has none, then serve every model in it.
serve: venv
	@if [ -z "$$(ls -d $(MODEL_REPOSITORY)/digits/[0-9]* 2>/dev/null)" ]; then \
		$(VENV)/bin/batchwire train digits --model-repository $(MODEL_REPOSITORY); fi
	$(VENV)/bin/batchwire serve --model-repository $(MODEL_REPOSITORY) --host $(HOST) --port $(PORT)

train: venv
	$(VENV)/bin/batchwire train digits --model-repository $(MODEL_REPOSITORY)

# Two pytest processes: tritonclient and our stubs both register the protobuf package
# `inference`, so tests that import tritonclient run in a process of their own.
test: venv
	$(PY) -m pytest tests --ignore=tests/clients
	$(PY) -m pytest tests/clients

# Regenerate the gRPC stubs (+ .pyi types); the repository root is the include path so the
# modules are `protos.*_pb2` (importable by that name from anywhere, e.g. Ray replicas).
protos: venv
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy batchwire server batching engines trainer loadtests monitoring

perf-analyzer:
	../shared/tools/install-perf-analyzer.sh .perf-analyzer

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Side-by-side benchmark (issue #3): batchwire, MLServer, PyTriton and a bare grpc.aio servicer
# serving mlp64, measured one after another with perf_analyzer (see loadtests/bench.py).
# Creates the peers' venvs (loadtests/peers/setup.sh) and perf_analyzer when missing.
# Arguments: make bench BENCH_ARGS="--concurrency 1 32 --runs 3".
BENCH_ARGS ?=
.PHONY: bench
bench: venv .perf-analyzer/perf_analyzer
	PYTHON=$(PYTHON) loadtests/peers/setup.sh
	$(PY) -m loadtests.bench $(BENCH_ARGS)

.perf-analyzer/perf_analyzer:
	../shared/tools/install-perf-analyzer.sh .perf-analyzer

# Headless Locust run against a running server (`make serve` in another terminal, or
# `batchwire serve --ray`), gated on each model's SLO (config.yaml) and on errors; writes
# CSV + HTML to loadtests/results/locust/ (see loadtests/locust_gate.py).
LOCUST_HOST ?= $(HOST):$(PORT)
LOCUST_USERS ?= 8
LOCUST_RUN_TIME ?= 30s
LOCUST_MODELS ?= digits
LOCUST_ARGS ?=
.PHONY: loadtest
loadtest: venv
	$(PY) -m loadtests.locust_gate --host $(LOCUST_HOST) --users $(LOCUST_USERS) \
		--run-time $(LOCUST_RUN_TIME) --models $(LOCUST_MODELS) --model-repository $(MODEL_REPOSITORY) \
		$(LOCUST_ARGS)
