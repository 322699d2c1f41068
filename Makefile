# The two commands of the README (each sets up .venv first, see scripts/setup_env.sh):
#   make demo   the main job on the offline default (SmolLM2-135M, GSM8K format, CPU)
#   make test   the test suite
PY := .venv/bin/python
DEMO_CONFIG ?= configs/experiments/cpu_smollm2_gsm8k_lora.yaml
# Real data for integration tests, when the shared copy is beside the checkout.
export STRATO_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-all lint format

setup:
	@scripts/setup_env.sh

demo: setup
	$(PY) main.py --config $(DEMO_CONFIG)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q --run-slow

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
