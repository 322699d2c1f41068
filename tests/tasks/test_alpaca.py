"""Alpaca: JSON records with line-numbered errors, held-out split, 10k subset, loss/perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from strato_peft.config.schema import TaskConfig
from strato_peft.tasks import DataError, load_task


def _task(path: Path, **kwargs):
    return load_task(TaskConfig(name="alpaca", data_path=str(path), **kwargs))


def test_splits_are_disjoint_and_deterministic(alpaca_file: Path) -> None:
    task = _task(alpaca_file)
    train, held_out = task.train_examples(), task.eval_examples()
    assert len(train) + len(held_out) == 200 and held_out
    assert [e.id for e in task.test_examples()] == [e.id for e in held_out]
    assert not {e.id for e in train} & {e.id for e in held_out}
    assert task.data_source == f"data_path:{alpaca_file}"
    assert [e.id for e in _task(alpaca_file.parent).train_examples()] == [e.id for e in train]


def test_ten_k_subset_is_a_seeded_sample(
    alpaca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import strato_peft.tasks.alpaca as alpaca

    monkeypatch.setattr(alpaca, "SUBSET_SIZE", 50)
    first = [e.id for e in _task(alpaca_file, subset="10k").train_examples()]
    second = [e.id for e in _task(alpaca_file, subset="10k").train_examples()]
    assert first == second and len(first) == 50
    assert first != [e.id for e in _task(alpaca_file).train_examples()][:50]


def test_prompt_formats(alpaca_file: Path, tokenizer) -> None:
    task = _task(alpaca_file)
    with_input = next(e for e in task.train_examples() if e.metadata["input"])
    prompt, target = task.format_for_training(with_input, tokenizer)
    assert prompt.startswith("<|im_start|>") and with_input.metadata["input"] in prompt
    assert target == with_input.target + tokenizer.eos_token

    class NoTemplate:
        chat_template = None
        eos_token = "</s>"

    raw_prompt, raw_target = task.format_for_training(with_input, NoTemplate())
    assert raw_prompt.endswith("### Response:\n") and "### Input:\n" in raw_prompt
    assert raw_target == with_input.target + "</s>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "a"}\n]',
            r":3: record 2 misses input, output",
        ),
        (
            '[\n  {"instruction": "a", "input": "", "output": "b"},\n  {oops}\n]',
            r":3: invalid JSON",
        ),
        ('{"instruction": "a"}', r":1: expected a JSON array"),
        ('[\n  "just a string"\n]', r":2: expected an object"),
    ],
)
def test_malformed_json_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"data.json{message}"):
        _task(path).train_examples()


def test_jsonl_records_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(
        "".join(
            json.dumps({"instruction": f"i{i}", "input": "", "output": "o"}) + "\n"
            for i in range(5)
        )
    )
    assert len(_task(path).train_examples()) + len(_task(path).eval_examples()) == 5


def test_offline_without_data_names_the_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"tatsu-lab/alpaca.*task.data_path.*STRATO_DATA_DIR"):
        load_task(TaskConfig(name="alpaca")).train_examples()


def test_evaluate_reports_loss_and_perplexity(alpaca_file: Path, tokenizer, tiny_model) -> None:
    task = _task(alpaca_file)
    metrics = task.evaluate(tiny_model, tokenizer, batch_size=2, limit=3)
    assert metrics["n"] == 3 and metrics["tokens"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["loss"] > math.log(len(tokenizer)) * 0.5  # a random model is near uniform
    low, high = metrics["perplexity_ci95"]
    assert low <= metrics["perplexity"] <= high
    with pytest.raises(NotImplementedError, match="needs a model"):
        task.score_predictions([])
