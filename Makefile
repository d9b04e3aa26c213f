# `make repro` sets everything up and runs the pipeline; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
# No phone-home from DVC or MLflow.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install repro lint test test-fast test-avx2 ui
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

repro: install
	dvc repro

# ruff (ruff.toml): pyflakes, pycodestyle, import order, likely bugs; seconds.
lint: install
	ruff check .

# --durations: the slowest tests, so a slower suite shows where the time went
test: install
	python -m pytest -q --durations=20 tests

# The edit loop: everything but the tests that train through real dvc (under 3 minutes).
test-fast: install
	python -m pytest -q -m "not slow" tests

# The whole suite as on a CPU without native bf16 (AVX2 only), on any x86 machine.
test-avx2: install
	RESNET_TL_NATIVE_BF16=0 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m pytest -q tests

ui: install
	@echo "charts: http://127.0.0.1:5000/#/experiments/1/runs?compareRunsMode=CHART&workflowType=machine_learning"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1
