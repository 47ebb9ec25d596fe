# Two commands on a fresh machine:  `make run`  and  `make test`.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
ARGS    ?=
# uv installs every package from uv.lock; it lives in a small environment of its own,
# installed by pip from scripts/uv-requirements.txt (one version, checked by hash).
UV_DIR  ?= .uv
UV      := $(UV_DIR)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never
# Installed packages are byte-compiled once, at install: a process that starts never
# compiles aiohttp or redis-py again (half of each start where nothing writes .pyc files).
export UV_COMPILE_BYTECODE := 1

.PHONY: help run demo test test-fast lock lock-upgrade lock-check lint typecheck unit tools clean screenshots mixin dashboards kubernetes certs
.DEFAULT_GOAL := help

## help: list the targets (plain `make` does this)
help:
	@grep -E '^## [a-z-]+:' $(MAKEFILE_LIST) | sed 's/^## /  make /'

# Running needs the runtime alone (17 packages); the tests, linters and previews add the
# development extras (matplotlib, mypy, Kubernetes schemas...), ten times the size. Both
# come from uv.lock as it is (--locked: a lock that disagrees with pyproject.toml stops here).
$(UV): scripts/uv-requirements.txt
	$(PYTHON) -m venv $(UV_DIR)
	$(UV_DIR)/bin/pip install --quiet --require-hashes -r scripts/uv-requirements.txt
	touch $@

$(BIN)/.installed-run: pyproject.toml uv.lock $(UV)
	$(UV) sync --quiet --locked --inexact --python $(PYTHON)
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed-run
	$(UV) sync --quiet --locked --extra dev --python $(PYTHON)
	touch $@

## lock: bring uv.lock in line with pyproject.toml after an edit, moving no other pin
lock: $(UV)
	$(UV) lock --python $(PYTHON)

## lock-upgrade: every dependency to its newest release that pyproject.toml allows
lock-upgrade: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

## lock-check: fail when uv.lock and pyproject.toml disagree
lock-check: $(UV)
	@$(UV) lock --check --python $(PYTHON) \
		|| { echo "*** uv.lock disagrees with pyproject.toml: run make lock" >&2; exit 1; }

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
	@$(BIN)/python -m compileall -q exporter
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

## test-fast: the in-process tests alone (about 30 s; no Prometheus, Redis or exporter process)
test-fast: $(BIN)/.installed-dev
	$(BIN)/pytest -q -m "not e2e" $(PYTEST_ARGS)

## test: the lock's check, lint, type-check and the whole test suite
test: lock-check lint typecheck unit

## clean: remove the virtual environment and caches
clean:
	rm -rf $(VENV) $(UV_DIR) .mypy_cache .pytest_cache .ruff_cache .hypothesis
