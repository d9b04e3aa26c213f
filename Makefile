# `make repro` sets everything up and runs the pipeline; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
# No phone-home from DVC or MLflow.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install postgres-server repro lint test test-fast test-avx2 ui team-server
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

# PostgreSQL's server binaries: the tests start one (a study shared by workers). Debian's package
# where they are missing (elsewhere install PostgreSQL >= 13, server included, yourself).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
postgres-server:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { echo "installing PostgreSQL's server (Debian: postgresql)"; $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

repro: install
	dvc repro

# ruff (ruff.toml): pyflakes, pycodestyle, import order, likely bugs; seconds.
lint: install
	ruff check .

# Two test processes (pytest-xdist; tests sharing a set-up stay together): much of a test's time is
# process start-up and dvc's bookkeeping, which one core does while the other trains. (Three
# processes with one torch thread each were slower.) On a 2-core EPYC: 7.5 to 10.5 minutes,
# native or `test-avx2` alike (its speed drifts by a third within an hour); on an AVX2-only CPU
# expect ~1.6x the emulated time.
# --durations: the slowest tests, so a slower suite shows where the time went.
PYTEST_PARALLEL ?= -n 2 --dist loadgroup
test: install postgres-server
	python -m pytest -q $(PYTEST_PARALLEL) --durations=20 tests

# The edit loop: everything but the tests that train through real dvc (under 3 minutes).
test-fast: install
	python -m pytest -q -m "not slow" tests

# The whole suite as on a CPU without native bf16 (AVX2 only), on any x86 machine.
test-avx2: install postgres-server
	RESNET_TL_NATIVE_BF16=0 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
	  python -m pytest -q $(PYTEST_PARALLEL) --durations=20 tests

ui: install
	@echo "charts: http://127.0.0.1:5000/#/experiments/1/runs?compareRunsMode=CHART&workflowType=machine_learning"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1

# A team's MLflow server (README "Scaling out"): runs and the registry in PostgreSQL, artifacts
# (models included) proxied by the server into ARTIFACTS, so clients need no storage credentials.
#   make team-server DB=postgresql+psycopg://mlflow@db.example.org/mlflow ARTIFACTS=s3://bucket/mlflow
HOST ?= 0.0.0.0
PORT ?= 5000
WORKERS ?= 4
team-server:
	@test -n "$(DB)" -a -n "$(ARTIFACTS)" || { echo "give DB=postgresql+psycopg://... ARTIFACTS=<folder or s3://...>"; exit 2; }
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec mlflow server --backend-store-uri "$(DB)" \
	  --artifacts-destination "$(ARTIFACTS)" --serve-artifacts --host $(HOST) --port $(PORT) --workers $(WORKERS)
