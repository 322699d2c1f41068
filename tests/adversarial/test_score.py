"""Adversarial ``strato-peft score``: repeated ids, empty and malformed predictions files
(issue: hardening). Every failure is one line on stderr naming the file (and line), exit
code 1, no traceback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from strato_peft.cli import main as cli
from tests.tasks.conftest import humaneval_dir, mmlu_dir, write_jsonl  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
PROBLEMS = 20


@pytest.fixture
def gsm8k_20(tmp_path: Path) -> Path:
    """A GSM8K folder whose test split has 20 problems, ``test/i`` answered ``i``."""
    rows = [{"question": f"What is {i}?", "answer": f"#### {i}"} for i in range(PROBLEMS)]
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows)
    return tmp_path / "gsm8k"


def _all_right_plus_one_wrong_duplicate(path: Path) -> Path:
    rows = [{"id": f"test/{i}", "completion": f"#### {i}"} for i in range(PROBLEMS)]
    return write_jsonl(path, [*rows, {"id": "test/3", "completion": "#### 99"}])


def _score(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli(["score", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _gsm8k(folder: Path, predictions: Path, *extra: str) -> tuple[str, ...]:
    return (
        "--task",
        "gsm8k",
        "--predictions",
        str(predictions),
        "--data-path",
        str(folder),
        *extra,
    )


def _one_line_error(code: int, out: str, err: str) -> str:
    assert code == 1 and out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_a_repeated_id_is_an_error_naming_it_and_its_lines(
    tmp_path: Path, gsm8k_20: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: 20 right + 1 duplicate scored 20/21 = 0.952 with n=21.
    predictions = _all_right_plus_one_wrong_duplicate(tmp_path / "p.jsonl")
    err = _one_line_error(*_score(capsys, *_gsm8k(gsm8k_20, predictions)))
    assert f"{predictions}: duplicated id(s) 'test/3' (lines 4, 21)" in err and "--dedupe" in err


def test_dedupe_keeps_the_first_row_and_warns(
    tmp_path: Path,
    gsm8k_20: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    predictions = _all_right_plus_one_wrong_duplicate(tmp_path / "p.jsonl")
    with caplog.at_level(logging.WARNING):
        code, out, _ = _score(capsys, *_gsm8k(gsm8k_20, predictions, "--dedupe"))
    metrics = json.loads(out)
    assert code == 0 and metrics["n"] == PROBLEMS and metrics["strict-match"] == 1.0
    assert "'test/3' (lines 4, 21)" in caplog.text and "dropped 1 row(s)" in caplog.text


def test_mmlu_repeated_id_is_an_error(
    tmp_path: Path,
    mmlu_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [{"id": "abstract_algebra/test/0", "choice": c} for c in ("A", "B")]
    predictions = write_jsonl(tmp_path / "p.jsonl", rows)
    args = ("--task", "mmlu", "--predictions", str(predictions), "--data-path", str(mmlu_dir))
    err = _one_line_error(*_score(capsys, *args))
    assert "'abstract_algebra/test/0' (lines 1, 2)" in err


def test_humaneval_takes_several_samples_per_task(
    tmp_path: Path,
    humaneval_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [
        {"task_id": "HumanEval/0", "completion": "    return a + b\n"},
        {"task_id": "HumanEval/0", "completion": "    return 0\n"},
    ]
    predictions = write_jsonl(tmp_path / "samples.jsonl", rows)
    args = ("--task", "humaneval", "--predictions", str(predictions))
    code, out, _ = _score(capsys, *args, "--data-path", str(humaneval_dir), "--workers", "1")
    assert code == 0 and json.loads(out)["samples"] == 2 and json.loads(out)["pass@1"] == 0.5


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_predictions_file_is_an_error(
    tmp_path: Path, gsm8k_20: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    # Before: NaN metrics with exit code 0.
    predictions = tmp_path / "p.jsonl"
    predictions.write_bytes(content)
    err = _one_line_error(*_score(capsys, *_gsm8k(gsm8k_20, predictions)))
    assert f"{predictions}: no predictions" in err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"id": "test/0", "completion": "#### 0"}\n{"id": "test/1", "completion": "\xff"}\n', ":2: not UTF-8 text (byte 0xff"),
        (b'{"id": "test/0", "completion": "#### 0"}\n{"id": "test/1"}\n', ":2: needs 'task_id' or 'id' and 'completion'"),
        (b'{"id": "test/0", "completion": "#### 0"}\n{"id": \n', ":2: invalid JSON"),
    ],
    ids=["not-utf8", "missing-field", "bad-json"],
)  # fmt: skip
def test_a_malformed_predictions_line_names_file_and_line(
    tmp_path: Path,
    gsm8k_20: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    fragment: str,
) -> None:
    predictions = tmp_path / "p.jsonl"
    predictions.write_bytes(content)
    err = _one_line_error(*_score(capsys, *_gsm8k(gsm8k_20, predictions)))
    assert f"{predictions}{fragment}" in err


def test_a_missing_predictions_file_names_it(
    tmp_path: Path, gsm8k_20: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _one_line_error(*_score(capsys, *_gsm8k(gsm8k_20, tmp_path / "absent.jsonl")))
    assert f"{tmp_path / 'absent.jsonl'}: cannot read" in err


def test_the_installed_command_prints_no_traceback(tmp_path: Path, gsm8k_20: Path) -> None:
    """The whole process, as a user runs it: one line on stderr, exit code 1."""
    predictions = _all_right_plus_one_wrong_duplicate(tmp_path / "p.jsonl")
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "score", *_gsm8k(gsm8k_20, predictions)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("strato-peft score: ") and "Traceback" not in result.stderr
    assert "duplicated id(s) 'test/3'" in result.stderr


def test_an_unknown_id_names_the_predictions_file(
    tmp_path: Path, gsm8k_20: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": "test/99", "completion": "#### 1"}])
    err = _one_line_error(*_score(capsys, *_gsm8k(gsm8k_20, predictions)))
    assert f"{predictions}: unknown gsm8k id 'test/99'" in err


def test_the_scoring_interface_refuses_repeated_ids_and_no_rows(gsm8k_20: Path) -> None:
    """The same rule for callers of ``score_predictions`` that read no file."""
    from strato_peft.config.schema import TaskConfig
    from strato_peft.tasks import DataError, load_task

    task = load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_20)))
    rows = [{"id": "test/1", "completion": "#### 1"}, {"id": "test/1", "completion": "#### 2"}]
    with pytest.raises(DataError, match=r"predictions rows 1, 2 repeat id 'test/1'"):
        task.score_predictions(rows)
    with pytest.raises(DataError, match="no predictions to score"):
        task.score_predictions([])


def test_humaneval_without_bubblewrap_refuses_unless_unsafe_exec(
    tmp_path: Path,
    humaneval_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from strato_peft.tasks import sandbox

    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    rows = [{"task_id": "HumanEval/0", "completion": "    return a + b\n"}]
    predictions = write_jsonl(tmp_path / "samples.jsonl", rows)
    args = ("--task", "humaneval", "--predictions", str(predictions),
            "--data-path", str(humaneval_dir), "--workers", "1")  # fmt: skip
    code, out, err = _score(capsys, *args)
    assert "bubblewrap" in _one_line_error(code, out, err)
    code, out, err = _score(capsys, *args, "--unsafe-exec")
    assert code == 0 and json.loads(out)["pass@1"] == 1.0
