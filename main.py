#!/usr/bin/env python
"""Entry point of the product spec: ``python main.py --config FILE [--seed N] ...``.

A thin wrapper over :func:`strato_peft.cli.main`; works from a checkout without
``pip install -e .`` too.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from strato_peft.cli import main

if __name__ == "__main__":
    sys.exit(main())
