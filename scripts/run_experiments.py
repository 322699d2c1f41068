#!/usr/bin/env python
"""Run every experiment config x seeds; skips complete runs, retries failed ones once (`strato-peft run-experiments`).

python scripts/run_experiments.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft.commands.analysis import run_experiments

if __name__ == "__main__":
    sys.exit(run_experiments(sys.argv[1:]))
