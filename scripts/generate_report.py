#!/usr/bin/env python
"""One self-contained HTML report (and Markdown) of a results folder (`strato-peft report`).

python scripts/generate_report.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft.commands.analysis import report

if __name__ == "__main__":
    sys.exit(report(sys.argv[1:]))
