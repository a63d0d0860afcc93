# Every target creates what it needs: the virtualenv and the generated code.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/worker/expbuild-worker.toml
PORT ?=
PYTEST_ARGS ?=

.PHONY: run test protos check-protos lint unit bench venv docker clean agent

$(BIN)/activate: pyproject.toml
	@# A fresh Debian has python3 without the venv module: install it when we can (root), else say so.
	$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	  $(PYTHON) -m venv --clear $(VENV); \
	} || { echo "make: cannot create $(VENV); install python3-venv (apt-get install python3-venv)" >&2; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/activate

venv: $(BIN)/activate

AGENT_DIR := expbuild_worker/execution/agent
AGENT := $(AGENT_DIR)/expbuild-agent
CC ?= cc

## agent: the static in-container agent for Docker pool containers (skipped, with a note, without a C compiler)
agent: $(AGENT)

$(AGENT): $(AGENT_DIR)/expbuild_agent.c
	@if command -v $(CC) >/dev/null 2>&1; then \
	  $(CC) -static -Os -s -Wall -Wextra -Werror -o $@ $< && echo "built $@"; \
	else \
	  echo "make: no C compiler ($(CC)): pool containers will be entered by the engine's exec"; \
	fi

## protos: regenerate expbuild_worker/api/v1 from proto/ with the pinned generator
protos: venv
	$(BIN)/python scripts/gen_protos.py

## check-protos: fail when the committed generated code differs from a fresh generation
check-protos: venv
	$(BIN)/python scripts/check_protos.py

## run: start the worker with the host executor on 127.0.0.1:50051 (CONFIG=… another config, PORT=… another port)
run: venv agent
	$(BIN)/expbuild-worker serve --config $(CONFIG)$(if $(PORT), --port $(PORT))

## lint: ruff and mypy --strict on our package
lint: venv
	$(BIN)/ruff check expbuild_worker tests benchmarks scripts examples
	$(BIN)/ruff format --check expbuild_worker tests benchmarks scripts examples
	$(BIN)/mypy

## test: the whole suite (protos fresh, lint, unit, integration, Docker when an engine answers)
test: venv agent check-protos lint
	$(BIN)/pytest $(PYTEST_ARGS)

## docker: make a local Docker engine answer (installs docker.io when missing; needs root)
docker:
	bash scripts/ensure-docker.sh

## bench: benchmarks printing numbers and ratios measured in one run
bench: venv agent
	$(BIN)/python benchmarks/bench_host.py
	$(BIN)/python benchmarks/bench_docker.py
	$(BIN)/python benchmarks/bench_reapi.py
	$(BIN)/python benchmarks/bench_backends.py
	$(BIN)/python benchmarks/bench_load.py

clean:
	rm -f $(AGENT)
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
