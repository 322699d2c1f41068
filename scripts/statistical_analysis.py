#!/usr/bin/env python
"""Seed statistics: mean, std, paired t-test and bootstrap CI against LoRA (`strato-peft stats`).

python scripts/statistical_analysis.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft.commands.analysis import stats

if __name__ == "__main__":
    sys.exit(stats(sys.argv[1:]))
