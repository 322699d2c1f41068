"""Adversarial run folders: a folder's identity is its resolved config, a fast dev run is
never the real run, nothing empty or NaN is complete, and no run writes outside
output.dir (issue: hardening)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from strato_peft.cli import main
from strato_peft.config import load_config
from strato_peft.results import RunFileError, run_dir
from strato_peft.training.run import check_results
from tests.conftest import CONFIGS
from tests.test_training import gsm8k_dir, tiny_args  # noqa: F401  (fixture)

SHORT = ("--override", "training.max_steps=2", "--override", "task.final_eval=false")


def folders(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*/*/*") if p.is_dir())


def test_a_fast_dev_run_never_stands_in_for_the_real_run(
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    assert main(tiny_args("lora", gsm8k_dir, tmp_path, "--fast-dev-run")) == 0
    (smoke,) = folders(tmp_path)
    assert smoke.name == "lora_rank16_seed42_fast-dev-run"
    assert json.loads((smoke / "metrics.json").read_text())["fast_dev_run"] is True
    # the real run of the same config (another learning rate and length) trains for real
    real = [*SHORT, "--override", "training.learning_rate=1e-3"]
    assert main(tiny_args("lora", gsm8k_dir, tmp_path, *real)) == 0
    names = [p.name for p in folders(tmp_path)]
    assert names == ["lora_rank16_seed42", "lora_rank16_seed42_fast-dev-run"]
    metrics = json.loads(
        (tmp_path / "tiny_llama" / "gsm8k" / names[0] / "metrics.json").read_text()
    )
    assert metrics["steps"] == 2 and metrics["fast_dev_run"] is False


def test_a_folder_of_another_config_is_refused_naming_the_keys(
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(tiny_args("lora", gsm8k_dir, tmp_path, *SHORT)) == 0
    (folder,) = folders(tmp_path)
    before = (folder / "metrics.json").read_text()
    changed = [*SHORT, "--override", "training.learning_rate=3e-4",
               "--override", "training.max_steps=3"]  # fmt: skip
    capsys.readouterr()
    assert main(tiny_args("lora", gsm8k_dir, tmp_path, *changed)) != 0
    err = capsys.readouterr().err
    assert "training.learning_rate" in err and "training.max_steps" in err
    assert "--resume-anyway" in err and "Traceback" not in err
    assert (folder / "metrics.json").read_text() == before  # the complete run is untouched
    # a partial run (killed after its checkpoint) is refused the same way
    (folder / "status.json").write_text(json.dumps({"status": "failed"}))
    for name in ("metrics.json", "costs.json"):
        (folder / name).unlink()
    assert list((folder / "checkpoints").glob("step_*"))
    saved_config = (folder / "config.yaml").read_text()
    assert main(tiny_args("lora", gsm8k_dir, tmp_path, *changed)) != 0
    assert "a partial run" in capsys.readouterr().err
    assert (folder / "config.yaml").read_text() == saved_config  # not rewritten
    # the same config resumes; --resume-anyway reuses it under the new one, said in the log
    assert main(tiny_args("lora", gsm8k_dir, tmp_path, *changed, "--resume-anyway")) == 0
    assert "reused (--resume-anyway)" in (folder / "training.log").read_text()
    # settings that do not change what is trained are not a different identity
    again = [*changed, "--override", "training.save_every_steps=1"]
    assert main(tiny_args("lora", gsm8k_dir, tmp_path, *again)) == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.name", "../../../x"), ("model.name", "/tmp/elsewhere"), ("task.name", "..")],
)
def test_no_run_folder_leaves_output_dir(key: str, value: str, tmp_path: Path) -> None:
    config = load_config(CONFIGS / "experiments" / "tiny_lora.yaml", [f"output.dir={tmp_path}"])
    section, field = key.split(".")
    if section == "model":
        config = config.model_copy(update={"model": config.model.model_copy(update={field: value})})
    else:
        config = config.model_copy(update={"task": config.task.model_copy(update={field: value})})
    with pytest.raises(RunFileError, match=key.replace(".", r"\.")):
        run_dir(config, "lora_rank16")


def test_the_dry_run_refuses_a_model_name_that_leaves_output_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--config", str(CONFIGS / "experiments" / "tiny_lora.yaml"), "--dry-run",
            "--override", f"output.dir={tmp_path}", "--override", "model.name=../../../x"]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "model.name='../../../x'" in err and "Traceback" not in err
    assert not list(tmp_path.parent.glob("x"))


def test_an_empty_test_file_fails_the_run_instead_of_completing(
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((gsm8k_dir / "train.jsonl").read_text())
    (data / "test.jsonl").write_text("")
    args = tiny_args("lora", data, tmp_path / "out", "--override", "training.max_steps=1")
    capsys.readouterr()
    assert main(args) != 0
    assert "Traceback" not in capsys.readouterr().err
    (folder,) = folders(tmp_path / "out")
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] != "complete" and not (folder / "metrics.json").exists()
    assert "test split is empty" in status["error"]  # the data check, before training
    assert not (folder / "checkpoints").exists()


@pytest.mark.parametrize(
    ("final", "task", "message"),
    [
        ({"n": 0, "answer_tokens": 0, "eval_loss": 0.0}, {}, "no example"),
        ({"n": 4, "answer_tokens": 20, "eval_loss": math.nan}, {}, "final.eval_loss"),
        ({"n": 4, "answer_tokens": 20, "eval_loss": 1.0}, {"n": 0, "acc": math.nan}, "no example"),
        ({"n": 4, "answer_tokens": 20, "eval_loss": 1.0}, {"n": 3, "acc": math.inf}, "task.acc"),
    ],
)
def test_empty_or_nan_results_are_errors(final: dict, task: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        check_results(final, task)
    check_results({"n": 4, "answer_tokens": 20, "eval_loss": 1.0}, {"n": 3, "acc": 0.5})
