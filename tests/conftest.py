"""Shared test set-up: offline hub, opt-in slow tests, paths to shipped configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PART_FOLDERS = ("base", "models", "tasks", "peft")


def entry_configs() -> list[Path]:
    """Every runnable shipped config (not the parts they are composed from)."""
    return sorted(
        p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] not in PART_FOLDERS
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def configs_root() -> Path:
    return CONFIGS
