"""GSM8K: answer extraction, the easy subset, data sources and malformed data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strato_peft.config.schema import TaskConfig
from strato_peft.tasks import DataError, load_task
from strato_peft.tasks.gsm8k import (
    extract_flexible,
    extract_strict,
    normalize_number,
    solution_steps,
)

from .conftest import GSM8K_ROWS, write_jsonl

CASES = [
    # completion, strict-match, flexible-extract
    ("so the answer is 18.\n#### 18", "18", "18"),
    ("#### 1,234", "1234", "1234"),
    ("It costs $1,234.00 in total.", None, "1234"),
    ("#### $1,234.00", "1234", "1234"),
    ("The temperature drops to -5 degrees.", None, "-5"),
    ("#### -5", "-5", "-5"),
    ("She has 7 apples, so 3 + 4 = 7.", None, "7"),
    ("#### 0.5", "0.5", "0.5"),
    ("The answer is 2.50 dollars", None, "2.5"),
    ("First 12, then 30, finally 42", None, "42"),
    ("#### 12\nAnd then some text with 99 in it", "12", "99"),
    ("no number here", None, None),
    ("", None, None),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), CASES)
def test_extraction_table(text: str, strict: str | None, flexible: str | None) -> None:
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("1,234", "1234"),
        ("$1,234.00", "1234"),
        ("18.", "18"),
        ("-3", "-3"),
        ("007", "7"),
        ("x", None),
    ],
)
def test_normalize_number(raw: str, normal: str | None) -> None:
    assert normalize_number(raw) == normal


def test_solution_steps_count_calculator_annotations() -> None:
    assert solution_steps(GSM8K_ROWS[2]["answer"]) == 4
    assert solution_steps("no annotations\n#### 3") == 0


def test_splits_and_easy_subset(gsm8k_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    task = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir)))
    train, held_out, test = task.train_examples(), task.eval_examples(), task.test_examples()
    assert len(train) + len(held_out) == 104 and held_out and len(test) == 4
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert test[1].metadata["gold"] == "1200" and test[1].id == "test/1"
    assert task.data_source == f"data_path:{gsm8k_dir}"
    easy = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir), subset="easy"))
    with caplog.at_level("INFO"):
        assert [e.id for e in easy.test_examples()] == ["test/0", "test/1", "test/3"]
    assert "3 test problems qualify" in caplog.text


def test_limit_caps_every_split(gsm8k_dir: Path) -> None:
    task = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir), limit=2))
    assert len(task.train_examples()) == 2 and len(task.test_examples()) == 2
    task = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir), limit=2, eval_limit=3))
    assert len(task.train_examples()) == 2 and len(task.test_examples()) == 3
    assert len(task.test_examples(limit=1)) == 1


def test_format_for_training_uses_the_chat_template(gsm8k_dir: Path, tokenizer) -> None:
    task = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir)))
    example = task.test_examples()[0]
    prompt, target = task.format_for_training(example, tokenizer)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert "Question: Tom has 3 apples" in prompt
    assert target == example.target + tokenizer.eos_token
    assert target.rstrip(tokenizer.eos_token).endswith("#### 7")


def test_environment_data_root_is_used(gsm8k_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATO_DATA_DIR", str(gsm8k_dir.parent))
    task = load_task(TaskConfig(name="gsm8k"))
    assert len(task.test_examples()) == 4
    assert task.data_source == f"STRATO_DATA_DIR:{gsm8k_dir}"


def test_no_source_names_the_offline_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATO_DATA_DIR", str(tmp_path))  # exists, but has no gsm8k/
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(__import__("sys").modules, "reasoning_gym", None)
    with pytest.raises(
        DataError, match=r"HF_HUB_OFFLINE.*task.data_path.*STRATO_DATA_DIR.*reasoning-gym"
    ):
        load_task(TaskConfig(name="gsm8k")).test_examples()


def test_missing_data_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_task(TaskConfig(name="gsm8k", data_path=str(tmp_path / "nope"))).test_examples()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json}", r"test.jsonl:2: invalid JSON"),
        ('{"question": "q?"}', r"test.jsonl:2: missing field\(s\) answer"),
        ('["a", "b"]', r"test.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "test.jsonl").write_text(json.dumps(GSM8K_ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        load_task(TaskConfig(name="gsm8k", data_path=str(folder))).test_examples()


def test_answer_without_marker_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "g" / "test.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"test.jsonl:1: answer has no '#### <number>'"):
        load_task(TaskConfig(name="gsm8k", data_path=str(tmp_path / "g"))).test_examples()


def test_score_predictions(gsm8k_dir: Path) -> None:
    task = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir)))
    rows = [
        {"id": "test/0", "completion": "3 + 4 = 7\n#### 7"},
        {"id": "test/1", "completion": "It is $1,200.00"},
        {"id": "test/2", "completion": "#### 15"},
        {"id": "test/3", "completion": "The answer is -5."},
    ]
    metrics = task.score_predictions(rows)
    assert metrics["strict-match"] == 0.25 and metrics["flexible-extract"] == 0.75
    assert metrics["n"] == 4 and "strict-match_stderr" in metrics
    with pytest.raises(DataError, match="unknown gsm8k id 'test/99'"):
        task.score_predictions([{"id": "test/99", "completion": "1"}])


def test_evaluate_tiny_model(gsm8k_dir: Path, tokenizer, tiny_model) -> None:
    task = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir)))
    task.max_new_tokens = 4  # type: ignore[misc]
    metrics = task.evaluate(tiny_model, tokenizer, batch_size=2, limit=3)
    assert metrics["n"] == 3
    assert 0.0 <= metrics["strict-match"] <= metrics["flexible-extract"] + 1.0
    assert [p["id"] for p in task.last_predictions] == ["test/0", "test/1", "test/2"]
