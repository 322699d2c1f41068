"""Adversarial task data and search archives: bytes that are not UTF-8, a bit-flipped
gzip, malformed archive rows, and the eager check of the evaluation data before
training (issue: hardening). Every error names the file and the line (or row)."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from strato_peft.cli import main as cli
from strato_peft.config.schema import TaskConfig
from strato_peft.registry import TASKS
from strato_peft.results import RunFileError
from strato_peft.strato.archive import Archive, Evaluation
from strato_peft.tasks import DataError, load_task
from strato_peft.tasks.base import Task, read_text
from tests.tasks.conftest import (  # noqa: F401  (fixtures)
    GSM8K_ROWS,
    HUMANEVAL_ROWS,
    alpaca_file,
    gsm8k_dir,
    humaneval_dir,
    mmlu_dir,
    write_jsonl,
)

BAD_BYTE = b"\xe9"  # latin-1 'e acute': not UTF-8 on its own


def _task(name: str, folder: Path, **settings: Any) -> Task:
    return load_task(TaskConfig(name=name, data_path=str(folder), **settings))


def _spoil_line(path: Path, line: int) -> None:
    """Put a byte that is not UTF-8 into ``line`` (1-based) of a text file."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b"?", b"?" + BAD_BYTE, 1)
    assert BAD_BYTE in lines[line - 1]
    path.write_bytes(b"\n".join(lines))


# -- encodings -------------------------------------------------------------------------
def test_gsm8k_bytes_not_utf8_name_file_and_line(gsm8k_dir: Path) -> None:  # noqa: F811
    _spoil_line(gsm8k_dir / "test.jsonl", 2)
    with pytest.raises(DataError, match=r"test.jsonl:2: not UTF-8 text \(byte 0xe9 at column"):
        load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir))).test_examples()


def test_mmlu_csv_bytes_not_utf8_name_file_and_physical_line(tmp_path: Path) -> None:
    folder = tmp_path / "mmlu" / "test"
    folder.mkdir(parents=True)
    path = folder / "anatomy_test.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        # the first record spans lines 1-2 (a quoted newline), the second is line 3
        csv.writer(handle).writerows([["q0?", "a\nb", "c", "d", "e", "A"], ["q1?", *"abcd", "B"]])
    _spoil_line(path, 3)
    with pytest.raises(DataError, match=r"anatomy_test.csv:3: not UTF-8"):
        load_task(TaskConfig(name="mmlu", data_path=str(tmp_path / "mmlu"))).test_examples()


def test_alpaca_json_bytes_not_utf8_name_file_and_line(alpaca_file: Path) -> None:  # noqa: F811
    text = alpaca_file.read_bytes().replace(b"Say the number 3.", b"Say the number 3" + BAD_BYTE)
    alpaca_file.write_bytes(text)
    line = text[: text.index(BAD_BYTE)].count(b"\n") + 1
    with pytest.raises(DataError, match=rf"alpaca_data.json:{line}: not UTF-8"):
        load_task(TaskConfig(name="alpaca", data_path=str(alpaca_file))).eval_examples()


def test_a_byte_order_mark_is_accepted(gsm8k_dir: Path) -> None:  # noqa: F811
    path = gsm8k_dir / "test.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(load_task(TaskConfig(name="gsm8k", data_path=str(gsm8k_dir))).test_examples()) == 4


def test_read_text_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{tmp_path / 'absent.csv'}: cannot read"):
        read_text(tmp_path / "absent.csv")


# -- gzip ------------------------------------------------------------------------------
def _bit_flipped(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "spoil",
    [
        _bit_flipped,
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p: p.write_bytes(b"not gzip at all\n"),
    ],
    ids=["bit-flipped", "truncated", "not-gzip"],
)
def test_a_corrupt_humaneval_gzip_names_the_file(humaneval_dir: Path, spoil: object) -> None:  # noqa: F811
    path = humaneval_dir / "HumanEval.jsonl.gz"
    spoil(path)  # type: ignore[operator]
    with pytest.raises(DataError, match=rf"{path}: corrupt gzip data (after|before) line \d+"):
        load_task(TaskConfig(name="humaneval", data_path=str(humaneval_dir))).test_examples()


def test_a_bit_flipped_gzip_through_score_is_one_line(
    tmp_path: Path,
    humaneval_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: a zlib.error / BadGzipFile traceback.
    _bit_flipped(humaneval_dir / "HumanEval.jsonl.gz")
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    data = ("--data-path", str(humaneval_dir))
    code = cli(["score", "--task", "humaneval", "--predictions", str(predictions), *data])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "HumanEval.jsonl.gz: corrupt gzip data" in err


def test_a_humaneval_field_that_is_not_text_names_the_line(humaneval_dir: Path) -> None:  # noqa: F811
    rows = [dict(r) for r in HUMANEVAL_ROWS[:3]]
    rows[1]["test"] = None
    write_jsonl(humaneval_dir / "HumanEval.jsonl.gz", rows)
    with pytest.raises(DataError, match=r"HumanEval.jsonl.gz:2: field\(s\) test must be strings"):
        load_task(TaskConfig(name="humaneval", data_path=str(humaneval_dir))).test_examples()


def test_a_repeated_humaneval_task_id_names_both_lines(humaneval_dir: Path) -> None:  # noqa: F811
    write_jsonl(humaneval_dir / "HumanEval.jsonl.gz", [*HUMANEVAL_ROWS[:2], HUMANEVAL_ROWS[0]])
    with pytest.raises(
        DataError, match=r"HumanEval.jsonl.gz:3: task_id 'HumanEval/0' repeats line 1"
    ):
        load_task(TaskConfig(name="humaneval", data_path=str(humaneval_dir))).test_examples()


def test_a_gsm8k_answer_that_is_not_text_names_the_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "g" / "test.jsonl", [GSM8K_ROWS[0], {"question": "q", "answer": 7}])
    with pytest.raises(DataError, match=r"test.jsonl:2: 'question' and 'answer' must be strings"):
        load_task(TaskConfig(name="gsm8k", data_path=str(tmp_path / "g"))).test_examples()


# -- the STRATO search archive ---------------------------------------------------------
def _archive_with_one_row(tmp_path: Path) -> Path:
    path = tmp_path / "archive.sqlite"
    archive = Archive(path, "protocol-1")
    archive.add(
        Evaluation(
            hash="abc123", allocation={"model.layers.0.self_attn.q_proj": 4}, eval_loss=1.5,
            params=512, params_fraction=0.5, flops_per_token=1e6, flops_fraction=0.6,
            memory_bytes=1e6, wall_time_s=2.0, source="search",
        )
    )  # fmt: skip
    archive.close()
    return path


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("allocation = '{\"q\": 4'", r"column 'allocation' is not valid JSON"),
        ("allocation = '[4, 8]'", r"column 'allocation' is not a JSON object \(got list\)"),
        ("allocation = '{\"q\": \"four\"}'", r"column 'allocation' must map module names to integer"),
        ("extra = 'oops'", r"column 'extra' is not valid JSON"),
        ("eval_loss = 'nan?'", r"column 'eval_loss' is not a number \(got 'nan\?'\)"),
    ],
)  # fmt: skip
def test_a_malformed_archive_row_names_file_row_and_column(
    tmp_path: Path, assignment: str, message: str
) -> None:
    # Before: a bare json.JSONDecodeError (or a silently wrong Evaluation).
    path = _archive_with_one_row(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE evaluations SET {assignment}")
    archive = Archive(path, "protocol-1")
    with pytest.raises(RunFileError, match=rf"{path}: row 1 \(allocation abc123\): {message}"):
        archive.evaluations()
    archive.close()


def test_an_intact_archive_row_reads_back(tmp_path: Path) -> None:
    archive = Archive(_archive_with_one_row(tmp_path), "protocol-1")
    (evaluation,) = archive.evaluations()
    assert evaluation.allocation == {"model.layers.0.self_attn.q_proj": 4}
    assert evaluation.eval_loss == 1.5 and evaluation.extra == {}
    archive.close()


def test_a_file_that_is_not_an_archive_is_a_run_file_error(tmp_path: Path) -> None:
    path = tmp_path / "archive.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RunFileError, match=rf"{path}: not a usable STRATO archive"):
        Archive(path, "protocol-1")


# -- the eager check of the evaluation data (Task.check_data) ---------------------------
def test_check_data_finds_a_bad_test_line_before_training(gsm8k_dir: Path) -> None:  # noqa: F811
    # train.jsonl is fine: only the final evaluation would have read the bad line
    (gsm8k_dir / "test.jsonl").write_text(json.dumps(GSM8K_ROWS[0]) + "\n{broken\n")
    task = _task("gsm8k", gsm8k_dir)
    assert len(task.train_examples()) > 0
    with pytest.raises(DataError, match=r"test.jsonl:2: invalid JSON"):
        task.check_data()


def test_check_data_skips_the_test_data_without_a_final_eval(gsm8k_dir: Path) -> None:  # noqa: F811
    (gsm8k_dir / "test.jsonl").write_text("{broken\n")
    counts = _task("gsm8k", gsm8k_dir, final_eval=False).check_data()
    assert set(counts) == {"eval"} and counts["eval"] > 0


def test_check_data_rejects_an_empty_evaluation_split(gsm8k_dir: Path) -> None:  # noqa: F811
    (gsm8k_dir / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"task 'gsm8k' \(data_path:.*\): the test split is empty"):
        _task("gsm8k", gsm8k_dir).check_data()


def test_check_data_reads_the_mmlu_fewshot_pool(mmlu_dir: Path) -> None:  # noqa: F811
    _spoil_line(mmlu_dir / "dev" / "world_religions_dev.csv", 1)
    with pytest.raises(DataError, match=r"world_religions_dev.csv:1: not UTF-8"):
        _task("mmlu", mmlu_dir).check_data()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_check_data_of_every_task_counts_its_splits(
    name: str,
    request: pytest.FixtureRequest,
) -> None:
    """The contract row: every registered task checks its eval and test data."""
    fixtures = {"alpaca": "alpaca_file", "gsm8k": "gsm8k_dir", "humaneval": "humaneval_dir"}
    source = request.getfixturevalue(fixtures.get(name, f"{name}_dir"))
    subset = "10%" if name == "humaneval" else None
    counts = _task(name, source, subset=subset).check_data()
    assert set(counts) == {"eval", "test"} and min(counts.values()) > 0
