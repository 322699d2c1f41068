"""Integration tests: whole runs in subprocesses, real data, the real model.

Run with ``pytest tests/integration/`` (``make test`` runs them after the fast suite);
``pytest tests/`` alone leaves this folder out (see ``tests/conftest.py``).
"""

from tests.tasks.conftest import real_data  # noqa: F401  (fixture)
from tests.test_training import gsm8k_dir  # noqa: F401  (fixture)
