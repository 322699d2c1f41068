#!/usr/bin/env python
"""Comparison table and PASS / FAIL / NOT ENOUGH DATA verdicts against LoRA (`strato-peft compare`).

python scripts/compare.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft.commands.analysis import compare

if __name__ == "__main__":
    sys.exit(compare(sys.argv[1:]))
