"""Shared test set-up: offline hub, opt-in slow tests, paths to shipped configs.

The spec's test commands: ``pytest tests/`` runs the fast suite; ``pytest tests/integration/``
runs the tests that use real data, the real model or whole runs in subprocesses (they
are left out unless their folder is named on the command line, and marked
``integration``); ``pytest --cov=src tests/`` adds a coverage report.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
INTEGRATION = Path(__file__).resolve().parent / "integration"
PART_FOLDERS = ("base", "models", "tasks", "peft")


def entry_configs() -> list[Path]:
    """Every runnable shipped config (not the parts they are composed from)."""
    return sorted(
        p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] not in PART_FOLDERS
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def _names_integration(config: pytest.Config) -> bool:
    """Whether a command-line path points into (or at) ``tests/integration``."""
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == INTEGRATION or INTEGRATION in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.resolve() == INTEGRATION and not _names_integration(config):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def configs_root() -> Path:
    return CONFIGS
