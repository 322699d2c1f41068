#!/usr/bin/env python
"""Evaluate a run folder: ``python scripts/eval.py --checkpoint RUN_DIR [--task NAME] [--limit N]``.

The spec's script name, a thin wrapper over ``strato-peft eval`` (see
``src/strato_peft/commands/eval.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import strato_peft  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft.commands.eval import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
