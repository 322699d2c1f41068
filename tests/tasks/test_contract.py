"""Every registered task honours the interface the training loop relies on (one row per task)."""

from __future__ import annotations

from pathlib import Path

import pytest

from strato_peft.config.schema import TaskConfig
from strato_peft.registry import TASKS
from strato_peft.tasks import Example, Task, load_task

ROWS = {
    # task: (fixture giving its data, subset with a training split, metric with an error bar)
    "gsm8k": ("gsm8k_dir", None, "strict-match_stderr"),
    "mmlu": ("mmlu_dir", None, "acc_stderr"),
    "humaneval": ("humaneval_dir", "10%", "pass@1_stderr"),
    "alpaca": ("alpaca_file", None, "loss_stderr"),
}


def test_every_registered_task_has_a_row() -> None:
    assert set(ROWS) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_contract(name: str, request: pytest.FixtureRequest, tokenizer, tiny_model) -> None:
    fixture, subset, metric = ROWS[name]
    data: Path = request.getfixturevalue(fixture)
    task = load_task(TaskConfig(name=name, data_path=str(data), subset=subset, limit=4))
    assert isinstance(task, Task) and task.name == name
    for split in (task.train_examples(), task.eval_examples(), task.test_examples()):
        assert 0 < len(split) <= 4
        assert all(isinstance(e, Example) and e.id and e.prompt and e.target for e in split)
    assert task.data_source.startswith("data_path:")
    prompt, target = task.format_for_training(task.train_examples()[0], tokenizer)
    assert isinstance(prompt, str) and isinstance(target, str) and prompt and target
    if hasattr(task, "max_new_tokens"):
        task.max_new_tokens = 2  # type: ignore[misc]
    metrics = task.evaluate(tiny_model, tokenizer, batch_size=2, limit=2)
    assert metrics["n"] == 2 and metric in metrics


def test_unknown_task_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="did you mean 'gsm8k'"):
        TaskConfig(name="gsm8")
