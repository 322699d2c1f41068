"""Whole training runs in subprocesses: SIGKILL and SIGTERM then resume, two-process DDP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strato_peft.cli import main
from strato_peft.training.checkpoint import STATE_FILE, latest_checkpoint
from tests.conftest import ROOT
from tests.test_training import _command, _env, only_run, tiny_args


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(
    gsm8k_dir: Path, tmp_path: Path
) -> None:
    extra = (
        "--override", "training.max_steps=8",
        "--override", "training.save_every_steps=1",
        "--override", "task.final_eval=false",
    )  # fmt: skip
    reference = tmp_path / "reference"
    subprocess.run(
        _command("lora", gsm8k_dir, reference, *extra),
        cwd=ROOT,
        env=_env(),
        check=True,
        capture_output=True,
    )
    expected = json.loads((only_run(reference) / "metrics.json").read_text())

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _command("lora", gsm8k_dir, out, *extra), cwd=ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        folders = [
            p for p in out.glob("*/*/*/checkpoints/step_00000003") if (p / STATE_FILE).is_file()
        ]
        if folders or proc.poll() is not None:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = only_run(out)
    assert json.loads((folder / "status.json").read_text())["status"] == "running"
    assert not (folder / "metrics.json").exists(), "the run finished before it could be killed"
    done_before = latest_checkpoint(folder)
    assert done_before is not None and int(done_before.name.split("_")[1]) < 8

    subprocess.run(
        _command("lora", gsm8k_dir, out, *extra),
        cwd=ROOT,
        env=_env(),
        check=True,
        capture_output=True,
    )
    resumed = json.loads((folder / "metrics.json").read_text())
    assert [h["step"] for h in resumed["history"]] == list(range(1, 9))
    assert resumed["history"][-1]["loss"] == pytest.approx(
        expected["history"][-1]["loss"], rel=1e-6, abs=1e-7
    )
    assert resumed["final"]["eval_loss"] == pytest.approx(expected["final"]["eval_loss"], rel=1e-6)


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(
    gsm8k_dir: Path, tmp_path: Path
) -> None:
    extra = ("--override", "peft.dropout=0", "--override", "task.final_eval=false")
    single = tmp_path / "single"
    subprocess.run(
        _command("lora", gsm8k_dir, single, *extra, "--override", "training.batch_size=2"),
        cwd=ROOT, env=_env(), check=True, capture_output=True,
    )  # fmt: skip
    ddp = tmp_path / "ddp"
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    done = subprocess.run(
        [
            launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            *_command("lora", gsm8k_dir, ddp, *extra, "--override", "training.batch_size=1")[1:],
        ],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    env = json.loads((only_run(ddp) / "env.json").read_text())
    assert env["num_processes"] == 2
    one = json.loads((only_run(single) / "metrics.json").read_text())
    two = json.loads((only_run(ddp) / "metrics.json").read_text())
    assert len(one["history"]) == len(two["history"]) == 4
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert two["final"]["eval_loss"] == pytest.approx(one["final"]["eval_loss"], rel=1e-5)


def test_sigterm_marks_the_run_failed_and_it_resumes_later(gsm8k_dir: Path, tmp_path: Path) -> None:
    extra = ("--override", "training.max_steps=8", "--override", "training.save_every_steps=1",
             "--override", "task.final_eval=false")  # fmt: skip
    proc = subprocess.Popen(
        _command("lora", gsm8k_dir, tmp_path, *extra), cwd=ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(
            (p / STATE_FILE).is_file() for p in tmp_path.glob("*/*/*/checkpoints/step_00000002")
        ):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    folder = only_run(tmp_path)
    status = json.loads((folder / "status.json").read_text())
    assert proc.returncode != 0 and status == {
        **status,
        "status": "failed",
        "error": "interrupted by SIGTERM",
    }
    assert not (folder / "metrics.json").exists()
    assert main(tiny_args("lora", gsm8k_dir, tmp_path, *extra)) == 0
    assert re.search(r"resumed from step_0000000[2-7]", (folder / "training.log").read_text())
    assert [
        h["step"] for h in json.loads((folder / "metrics.json").read_text())["history"]
    ] == list(range(1, 9))
