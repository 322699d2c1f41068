"""Run-folder naming, atomic writes, resolved config and environment records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strato_peft.config import load_config
from strato_peft.methods import run_folder
from strato_peft.results import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    environment_info,
    save_resolved_config,
)
from tests.conftest import CONFIGS


def test_run_dir_follows_the_spec_naming() -> None:
    lora = load_config(CONFIGS / "llama2_7b_mmlu_lora.yaml", ["peft.rank=8"], seed=43)
    assert run_folder(lora) == Path("results/llama2_7b/mmlu/lora_rank8_seed43")
    strato = load_config(
        CONFIGS / "llama2_7b_mmlu_strato.yaml", ["peft.strato.lambda=0.25", "output.dir=/tmp/r"]
    )
    assert run_folder(strato) == Path("/tmp/r/llama2_7b/mmlu/strato_rank16_lambda0.25_seed42")


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})

    with pytest.raises(TypeError):  # fails mid-write: not a str
        atomic_write_text(target, object())  # type: ignore[arg-type]
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_resolved_config_repeats_the_run(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "experiments" / "tiny_dora.yaml", ["peft.rank=3"], seed=44)
    path = save_resolved_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml"
    assert load_config(path) == cfg


def test_environment_info_records_versions_and_seed() -> None:
    info = environment_info(42, {"platform": "cpu"})
    assert info["seed"] == 42 and info["platform"] == "cpu"
    assert info["packages"]["torch"].startswith("2.") and info["packages"]["peft"]
    assert info["hardware"]["cpu_count"] >= 1
    assert info["git_commit"] is None or len(info["git_commit"]) == 40


def test_run_files_and_folders_share_one_permission_policy(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        atomic_write_text(tmp_path / "b.jsonl", "{}\n")
        with atomic_directory(tmp_path / "adapter") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o750
