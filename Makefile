# The two commands of the README (each sets up .venv first, see scripts/setup_env.sh):
#   make demo   the main job on the offline default (SmolLM2-135M, GSM8K format, CPU)
#   make test   the test suite
PY := .venv/bin/python
DEMO_CONFIG ?= configs/experiments/cpu_smollm2_gsm8k_lora.yaml
# Real data for integration tests, when the shared copy is beside the checkout.
export STRATO_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup browser sandbox demo test test-all coverage lint format

setup:
	@scripts/setup_env.sh

# $(call apt_ensure,COMMAND,PACKAGE,WHAT FAILS WITHOUT IT): install a Debian package
# when its command is missing and we are root; otherwise warn.
apt_ensure = command -v $(1) >/dev/null 2>&1 || { \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
    echo "installing $(2) (apt-get)"; \
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
  else echo "warning: $(1) not found: $(3) (apt-get install $(2))"; fi; }

# Headless Chromium for the HTML-report test.
browser:
	@$(call apt_ensure,chromium,chromium,the report test will fail)

# bubblewrap, the HumanEval sandbox. See docs/security.md.
sandbox:
	@$(call apt_ensure,bwrap,bubblewrap,HumanEval and the sandbox tests will fail)

demo: setup
	$(PY) main.py --config $(DEMO_CONFIG)

# The fast suite (pytest tests/), then the integration tests (real data, the real model,
# whole runs in subprocesses).
test: setup browser sandbox
	$(PY) -m pytest -q tests/ tests/integration/

test-all: setup browser sandbox
	$(PY) -m pytest -q --run-slow tests/ tests/integration/

coverage: setup
	$(PY) -m pytest -q --cov=src --cov-report=term tests/

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
