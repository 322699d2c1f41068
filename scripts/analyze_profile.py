#!/usr/bin/env python
"""Summarise torch.profiler traces (--profile) by operator (`strato-peft analyze-profile`).

python scripts/analyze_profile.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft.commands.analysis import analyze_profile

if __name__ == "__main__":
    sys.exit(analyze_profile(sys.argv[1:]))
