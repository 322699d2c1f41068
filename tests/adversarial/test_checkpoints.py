"""Adversarial checkpoints: no code runs from one, bad content is one clear error, and a
corrupt newest checkpoint falls back to the newest intact one (issue: hardening)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from strato_peft.cli import main
from strato_peft.training.checkpoint import (
    CheckpointError,
    read_checkpoint,
    readable_checkpoint,
    set_rng_state,
)
from tests.test_training import gsm8k_dir, only_run, tiny_args  # noqa: F401  (fixture)

EXTRA = (
    "--override", "training.max_steps=4",
    "--override", "training.save_every_steps=2",
    "--override", "task.final_eval=false",
)  # fmt: skip


class Hostile:
    """A pickle whose unpickling runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished(gsm8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("finished")
    assert main(tiny_args("lora", gsm8k_dir, out, *EXTRA)) == 0
    return out


def killed_copy(finished: Path, target: Path) -> Path:
    """A copy of the finished run rolled back to its checkpoints, as if killed at step 4."""
    shutil.copytree(finished, target)
    folder = only_run(target)
    for stale in ("metrics.json", "costs.json", "status.json", "adapter"):
        path = folder / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]
    return folder


def plant_hostile(finished: Path, tmp_path: Path, *steps: str) -> tuple[Path, Path]:
    """A killed copy of the run (in ``tmp_path/run``) whose ``steps`` checkpoints are
    hostile pickles; the run folder and the marker file their command would create."""
    marker = tmp_path / "pwned"
    folder = killed_copy(finished, tmp_path / "run")
    for step in steps:
        torch.save({"adapter": Hostile(marker)}, folder / "checkpoints" / step / "state.pt")
    return folder, marker


def test_a_hostile_pickle_never_runs_and_an_intact_older_checkpoint_takes_over(
    finished: Path,
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, marker = plant_hostile(finished, tmp_path, "step_00000004")
    newest = folder / "checkpoints" / "step_00000004" / "state.pt"
    capsys.readouterr()
    assert main(tiny_args("lora", gsm8k_dir, tmp_path / "run", *EXTRA)) == 0
    assert not marker.exists()  # the command in the pickle never ran
    log = (folder / "training.log").read_text()
    assert "holds objects other than tensors" in log and str(newest) in log
    assert "resumed from step_00000002" in log
    expected = json.loads((only_run(finished) / "metrics.json").read_text())
    resumed = json.loads((folder / "metrics.json").read_text())
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(
        [h["loss"] for h in expected["history"]], rel=1e-6
    )


def test_when_no_checkpoint_reads_the_run_stops_with_one_line_naming_them(
    finished: Path,
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, marker = plant_hostile(finished, tmp_path, "step_00000002", "step_00000004")
    capsys.readouterr()
    assert main(tiny_args("lora", gsm8k_dir, tmp_path / "run", *EXTRA)) != 0
    err = capsys.readouterr().err
    assert "no checkpoint of" in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04 not really a checkpoint", "cannot be read"),
        ([1, 2, 3], "not a mapping"),
        ({"adapter": {}}, "lacks ranks"),
        (
            {"adapter": {"w": 3}, "ranks": {}, "optimizer": {}, "scheduler": {},
             "training": {}, "method": {}, "rng": {0: {}}},
            "adapter entry 'w' is not a tensor",
        ),
        (
            {"adapter": {}, "ranks": {}, "optimizer": {}, "scheduler": {},
             "training": {"stepz": 1}, "method": {}, "rng": {0: {}}},
            "unknown fields ['stepz']",
        ),
    ],
)  # fmt: skip
def test_unexpected_content_is_a_checkpoint_error_naming_the_file(
    content: object, message: str, tmp_path: Path
) -> None:
    step = tmp_path / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    if isinstance(content, bytes):
        (step / "state.pt").write_bytes(content)
    else:
        torch.save(content, step / "state.pt")
    with pytest.raises(CheckpointError, match="step_00000002") as exc:
        read_checkpoint(step)
    assert message in str(exc.value)
    with pytest.raises(CheckpointError, match="no checkpoint of"):
        readable_checkpoint(tmp_path)


def test_a_truncated_newest_checkpoint_falls_back(finished: Path, tmp_path: Path) -> None:
    folder = killed_copy(finished, tmp_path / "run")
    newest = folder / "checkpoints" / "step_00000004" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    found = readable_checkpoint(folder)
    assert found is not None and found[0].name == "step_00000002"


def test_a_checkpoint_of_the_earlier_format_still_loads(finished: Path, tmp_path: Path) -> None:
    """The earlier format kept numpy's RNG state as numpy's own tuple (an array inside):
    its three numpy globals are allow-listed, and the state restores."""
    folder = killed_copy(finished, tmp_path / "run")
    path = folder / "checkpoints" / "step_00000004"
    data = torch.load(path / "state.pt", weights_only=True)
    np.random.seed(7)
    legacy = np.random.get_state()
    expected = np.random.random(3)
    data["rng"][0]["numpy"] = legacy  # as the earlier format saved it
    torch.save(data, path / "state.pt")
    loaded = read_checkpoint(path)
    np.random.seed(0)
    set_rng_state(loaded["rng"][0])
    assert np.random.random(3) == pytest.approx(expected)
