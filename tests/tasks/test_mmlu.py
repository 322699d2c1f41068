"""MMLU: the lm-eval prompt, splits and subsets, malformed CSVs, scoring."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from strato_peft.config.schema import TaskConfig
from strato_peft.tasks import DataError, load_task

from .conftest import MMLU_SUBJECTS


def test_fewshot_prompt_follows_lm_eval(mmlu_dir: Path) -> None:
    task = load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir), num_fewshot=2))
    example = task.test_examples()[0]
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "abstract_algebra dev question 0, with a comma?\nA. a0\nB. b0\nC. c\n0\nD. d0\nAnswer: A\n\n"
        "abstract_algebra dev question 1, with a comma?\nA. a1\nB. b1\nC. c\n1\nD. d1\nAnswer: B\n\n"
        "abstract_algebra test question 0, with a comma?\nA. a0\nB. b0\nC. c\n0\nD. d0\nAnswer:"
    )
    assert task.fewshot_context(example) == expected
    assert example.id == "abstract_algebra/test/0" and example.target == "A"


def test_training_format_is_raw_with_a_space_before_the_letter(mmlu_dir: Path, tokenizer) -> None:
    task = load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir)))
    example = task.train_examples()[1]
    prompt, target = task.format_for_training(example, tokenizer)
    assert prompt.endswith("\nAnswer:") and "<|im_start|>" not in prompt
    assert target == " B"


def test_default_splits_and_dev_subset(mmlu_dir: Path) -> None:
    task = load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir)))
    assert (len(task.train_examples()), len(task.eval_examples()), len(task.test_examples())) == (
        12,
        10,
        8,
    )
    dev = load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir), subset="dev"))
    train, test = dev.train_examples(), dev.test_examples()
    assert len(train) + len(test) == 12
    assert not {e.id for e in train} & {e.id for e in test}
    assert all("/val/" in e.id for e in train + test)
    again = load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir), subset="dev"))
    assert [e.id for e in again.train_examples()] == [e.id for e in train]


def test_unknown_subset_suggests_the_known_one(mmlu_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown subset 'deev'.*known: dev.*did you mean 'dev'"):
        load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir), subset="deev"))


def test_wrong_column_count_names_file_and_line(mmlu_dir: Path) -> None:
    path = mmlu_dir / "test" / f"{MMLU_SUBJECTS[0]}_test.csv"
    with open(path, "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow(["question", "a", "b", "c", "A"])
    with pytest.raises(DataError, match=rf"{path.name}:9: expected 6 columns, got 5"):
        load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir))).test_examples()


def test_bad_answer_letter(mmlu_dir: Path) -> None:
    path = mmlu_dir / "test" / f"{MMLU_SUBJECTS[1]}_test.csv"
    with open(path, "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow(["q", "a", "b", "c", "d", "E"])
    with pytest.raises(DataError, match=r"answer must be one of A-D, got 'E'"):
        load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir))).test_examples()


def test_missing_layout(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match=r"no \*_test.csv files"):
        load_task(TaskConfig(name="mmlu", data_path=str(tmp_path))).test_examples()


def test_score_predictions_overall_and_per_subject(mmlu_dir: Path) -> None:
    task = load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir)))
    rows = [{"id": e.id, "choice": e.target} for e in task.test_examples()]
    rows[0]["choice"] = "D"
    rows[1]["choice"] = 1  # an index is accepted: "B", the gold of question 1
    metrics = task.score_predictions(rows)
    assert metrics["acc"] == pytest.approx(7 / 8) and metrics["n"] == 8
    assert metrics["acc_per_subject"] == {"abstract_algebra": 0.75, "world_religions": 1.0}
    with pytest.raises(DataError, match="choice must be A-D"):
        task.score_predictions([{"id": rows[0]["id"], "choice": "Z"}])


def test_evaluate_tiny_model(mmlu_dir: Path, tokenizer, tiny_model) -> None:
    task = load_task(TaskConfig(name="mmlu", data_path=str(mmlu_dir)))
    metrics = task.evaluate(tiny_model, tokenizer, batch_size=4)
    assert metrics["n"] == 8 and 0.0 <= metrics["acc"] <= 1.0
    assert set(metrics["acc_per_subject"]) == set(MMLU_SUBJECTS)
    assert {p["choice"] for p in task.last_predictions} <= {"A", "B", "C", "D"}
