# Two commands on a fresh machine:  `make run`  and  `make test`.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
ARGS    ?=

.PHONY: help run demo test test-fast lint typecheck unit tools clean screenshots mixin dashboards kubernetes certs
.DEFAULT_GOAL := help

## help: list the targets (plain `make` does this)
help:
	@grep -E '^## [a-z-]+:' $(MAKEFILE_LIST) | sed 's/^## /  make /'

# Running needs the runtime alone (17 packages); the tests, linters and previews add the
# development extras (matplotlib, mypy, Kubernetes schemas...), ten times the size.
$(BIN)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed-run
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## run: start the daemon on its defaults (logs/kling-*.jsonl, :10177); ARGS="..." adds flags
run: $(BIN)/.installed-run
	$(BIN)/kling-exporter $(ARGS)

## demo: synthetic Kling traffic into a temporary log folder, served on :10177
demo: $(BIN)/.installed-run
	$(BIN)/kling-exporter demo $(ARGS)

## screenshots: PNG previews of the dashboards from two simulated hours of demo data, into docs/
screenshots: $(BIN)/.installed-dev tools
	$(BIN)/python grafana/preview.py

## mixin: rewrite alerts/kling.*.yml, the dashboards and the Kubernetes resources from mixin/config.yml
mixin: $(BIN)/.installed-run
	$(BIN)/python mixin/build.py

## dashboards: rewrite grafana/dashboards/*.json from grafana/build_dashboards.py
dashboards: $(BIN)/.installed-run
	$(BIN)/python grafana/build_dashboards.py

## kubernetes: rewrite examples/kubernetes' PrometheusRule and dashboards ConfigMap
kubernetes: $(BIN)/.installed-run
	$(BIN)/python examples/kubernetes/build.py

## certs: a self-signed certificate and key for trying examples/web-config.yml (examples/tls/)
CERTS_DIR ?= examples/tls
certs:
	mkdir -p $(CERTS_DIR)
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
		-subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
		-keyout $(CERTS_DIR)/exporter.key -out $(CERTS_DIR)/exporter.crt 2>/dev/null
	chmod 600 $(CERTS_DIR)/exporter.key
	@echo "wrote $(CERTS_DIR)/exporter.crt and exporter.key (self-signed: for trying only)"

## tools: Prometheus, promtool, Alertmanager, amtool, logrotate, redis-server and redis-sentinel for the end-to-end tests
tools:
	@scripts/ensure-tools

## lint: ruff, the linter and the formatter's check
lint: $(BIN)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## typecheck: mypy --strict
typecheck: $(BIN)/.installed-dev
	$(BIN)/mypy

## unit: the test suite alone, four tests at a time (PYTEST_WORKERS=0 runs them one by one)
PYTEST_WORKERS ?= 4
unit: $(BIN)/.installed-dev tools
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

## test-fast: the in-process tests alone (about 30 s; no Prometheus, Redis or exporter process)
test-fast: $(BIN)/.installed-dev
	$(BIN)/pytest -q -m "not e2e" $(PYTEST_ARGS)

## test: lint, type-check and the whole test suite
test: lint typecheck unit

## clean: remove the virtual environment and caches
clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
