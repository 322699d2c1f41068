#!/usr/bin/env python
"""Figures: score vs params and FLOPs, training curves, rank heatmaps (`strato-peft visualize`).

python scripts/visualize_results.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft.commands.analysis import visualize

if __name__ == "__main__":
    sys.exit(visualize(sys.argv[1:]))
