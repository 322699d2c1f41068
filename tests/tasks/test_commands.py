"""``strato-peft score`` and ``strato-peft eval`` / ``scripts/eval.py`` through their public entry points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strato_peft.cli import main as cli
from strato_peft.config import load_config, resolved_yaml

from .conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _score(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = cli(["score", *args])
    out = capsys.readouterr().out.strip()
    return code, (json.loads(out) if out else {})


def test_score_gsm8k(tmp_path: Path, gsm8k_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    predictions = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "test/0", "completion": "#### 7"}, {"id": "test/3", "completion": "It is -5."}],
    )
    code, metrics = _score(
        capsys, "--task", "gsm8k", "--predictions", str(predictions), "--data-path", str(gsm8k_dir)
    )
    assert code == 0
    assert (
        metrics["strict-match"] == 0.5 and metrics["flexible-extract"] == 1.0 and metrics["n"] == 2
    )


def test_score_humaneval_samples_file(
    tmp_path: Path, humaneval_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .conftest import HUMANEVAL_ROWS

    rows = [
        {"task_id": r["task_id"], "completion": r["canonical_solution"]} for r in HUMANEVAL_ROWS[:4]
    ]
    predictions = write_jsonl(tmp_path / "samples.jsonl", rows)
    code, metrics = _score(
        capsys,
        "--task",
        "humaneval",
        "--predictions",
        str(predictions),
        "--data-path",
        str(humaneval_dir),
    )
    assert code == 0 and metrics["pass@1"] == 1.0 and metrics["n"] == 4


def test_score_mmlu(tmp_path: Path, mmlu_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    predictions = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "world_religions/test/2", "choice": "C"}]
    )
    code, metrics = _score(
        capsys, "--task", "mmlu", "--predictions", str(predictions), "--data-path", str(mmlu_dir)
    )
    assert code == 0 and metrics["acc"] == 1.0 and metrics["n"] == 1


def test_score_reports_a_bad_line(
    tmp_path: Path, gsm8k_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"id": "test/0", "completion": "#### 7"}\n{broken\n')
    code = cli(
        [
            "score",
            "--task",
            "gsm8k",
            "--predictions",
            str(predictions),
            "--data-path",
            str(gsm8k_dir),
        ]
    )
    assert code == 1
    assert "p.jsonl:2: invalid JSON" in capsys.readouterr().err


@pytest.fixture
def run_dir(tmp_path: Path, gsm8k_dir: Path) -> Path:
    """A run folder as the trainer leaves it: config.yaml and a (non-trivial) LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from strato_peft.models import load_model

    config = load_config(
        ROOT / "configs" / "experiments" / "tiny_lora.yaml",
        overrides=[f"task.data_path={gsm8k_dir}"],
    )
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(resolved_yaml(config))
    model = get_peft_model(
        load_model(config.model, seed=config.seed),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    model.save_pretrained(folder / "adapter")
    return folder


def test_eval_writes_metrics_and_predictions_atomically(
    run_dir: Path, tokenizer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import strato_peft.models
    from strato_peft.tasks.gsm8k import GSM8KTask

    monkeypatch.setattr(strato_peft.models, "load_tokenizer", lambda cfg: tokenizer)
    monkeypatch.setattr(GSM8KTask, "max_new_tokens", 3)
    assert cli(["eval", "--checkpoint", str(run_dir), "--limit", "2", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((run_dir / "eval_gsm8k.json").read_text())
    assert printed["written"] == str(run_dir / "eval_gsm8k.json")
    assert report["adapter"] is True and report["task"] == "gsm8k" and report["metrics"]["n"] == 2
    assert report["data_source"].startswith("data_path:")
    assert "strict-match_stderr" in report["metrics"]
    lines = (run_dir / "predictions_gsm8k.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["test/0", "test/1"]
    assert not list(run_dir.glob(".*.tmp"))
    # One permission policy for every run file: eval outputs are as readable as the rest
    # (a private mkstemp would leave them 0600 while config.yaml is 0644).
    import os

    from strato_peft.results import atomic_write_json

    atomic_write_json(run_dir / "metrics.json", {})
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {
        name: (run_dir / name).stat().st_mode & 0o777
        for name in ("eval_gsm8k.json", "predictions_gsm8k.jsonl", "metrics.json")
    }
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_eval_script_rejects_a_folder_without_config(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval.py"), "--checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "config.yaml not found" in done.stderr
