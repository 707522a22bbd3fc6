# pushstream developer tasks. `make test` and `make demo` work on a fresh clone:
# they create the virtualenv, resolve Kafka's jars with Maven and start a
# local broker as needed.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

# The first Python 3.11+ found; override with `make PYTHON=/path/to/python3.12`.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PUSHSTREAM := $(BIN)/pushstream

# The local broker: port and data folder as `pushstream kafka` reads them.
export PUSHSTREAM_KAFKA_PORT ?= 9092
export PUSHSTREAM_KAFKA_BOOTSTRAP ?= 127.0.0.1:$(PUSHSTREAM_KAFKA_PORT)

.PHONY: help venv lint format broker broker-down test deploy-check demo bench clean

help:
	@echo "make demo         a sample through broker, topics, sandbox and worker; prints the outcomes"
	@echo "                  (options: make demo DEMO_ARGS=\"--users 1000\", see pushstream demo --help)"
	@echo "make test         lint, start a broker if none runs, run the whole test suite"
	@echo "make deploy-check helm lint the chart, validate docker-compose.yml (builds helm)"
	@echo "make venv         create .venv and install pushstream with its dev tools"
	@echo "make lint         ruff check, ruff format --check, mypy"
	@echo "make format       ruff format and ruff check --fix"
	@echo "make broker       start the local Kafka broker (127.0.0.1:$(PUSHSTREAM_KAFKA_PORT))"
	@echo "make broker-down  stop it"
	@echo "make bench        run the benchmarks"
	@echo "make clean        stop the broker; remove the virtualenv, caches, jars and broker data"

venv: $(STAMP)

# Re-installs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "pushstream needs Python 3.11 or newer on PATH" >&2; exit 1; fi
	@if [ ! -x $(BIN)/python ]; then \
		echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); fi
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

broker: venv
	$(PUSHSTREAM) kafka up

broker-down: venv
	$(PUSHSTREAM) kafka down

# Starts a broker only if none runs on the port, and stops the broker it
# started however the run ends; the exit code is pytest's (or the first failure's).
test: venv lint deploy-check
	@if $(PUSHSTREAM) kafka in-use; then \
		echo "a broker answers on 127.0.0.1:$(PUSHSTREAM_KAFKA_PORT); using it and leaving it running"; \
	else \
		echo "no broker answers on 127.0.0.1:$(PUSHSTREAM_KAFKA_PORT); starting one, stopped after the tests"; \
		trap '$(PUSHSTREAM) kafka down' EXIT; \
		$(PUSHSTREAM) kafka up; \
	fi; \
	$(PUSHSTREAM) topics schemas; \
	$(PUSHSTREAM) topics create; \
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# helm is built from its Go module once, into .cache/bin (a few minutes; needs
# Go). tests/test_deploy.py renders the chart with it and validates the result
# against the Kubernetes schemas; this target runs the quick checks.
HELM := .cache/bin/helm
HELM_VERSION := v3.22.0

$(HELM):
	@command -v go >/dev/null || { echo "building helm needs Go on PATH" >&2; exit 1; }
	GOBIN=$(abspath .cache/bin) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

deploy-check: venv $(HELM)
	$(HELM) lint --strict helm/pushstream
	$(HELM) lint --strict helm/pushstream --set storage.mode=deployment \
		--set serviceMonitor.enabled=true
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

# Starts the broker (stopped again only if the demo started it), the sandbox
# and a worker; publishes a sample; prints the outcomes, then one JSON line.
demo: venv
	$(PUSHSTREAM) demo $(DEMO_ARGS)

# End-to-end speed and this machine's raw limits (bench/run.py --help);
# h2load comes from Debian's nghttp2-client, installed here when missing.
bench: venv
	@command -v h2load >/dev/null 2>&1 || { \
		echo "installing h2load (apt-get install nghttp2-client)"; \
		{ apt-get install -y -qq nghttp2-client || \
		  { apt-get update -qq && apt-get install -y -qq nghttp2-client; }; } >/dev/null 2>&1 || \
		echo "h2load could not be installed: the sandbox is measured with pushstream's own HTTP/2 client"; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	-@[ -x $(PUSHSTREAM) ] && $(PUSHSTREAM) kafka down || true
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
