#!/usr/bin/env python
"""Summarise a training.log: runs, levels, warnings and errors (`strato-peft analyze-logs`).

python scripts/analyze_logs.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft.commands.analysis import analyze_logs

if __name__ == "__main__":
    sys.exit(analyze_logs(sys.argv[1:]))
