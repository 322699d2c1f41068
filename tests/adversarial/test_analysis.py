"""Adversarial run folders for the analysis: it only reads files (no model code named in
a copied folder runs, no model is built), and fast dev runs or non-finite scores never
enter an average (issue: hardening)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from strato_peft.analysis.compare import compare_runs
from strato_peft.analysis.runs import discover_runs
from strato_peft.cli import main
from tests.test_training import gsm8k_dir, tiny_args  # noqa: F401  (fixture)

EVIL_CONFIG = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil"
"""


@pytest.fixture(scope="module")
def two_seeds(gsm8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("runs")
    for seed in ("42", "43"):
        extra = ("--seed", seed, "--override", "training.max_steps=1",
                 "--override", "task.final_eval=false")  # fmt: skip
        assert main(tiny_args("lora", gsm8k_dir, out, *extra)) == 0
    return out


def test_compare_never_runs_code_named_in_a_copied_run_folder(
    two_seeds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "evil_model"
    model_dir.mkdir()
    (model_dir / "evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    (model_dir / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))  # fmt: skip
    results = tmp_path / "results"
    shutil.copytree(two_seeds, results)
    for config_path in results.glob("*/*/*/config.yaml"):
        config = yaml.safe_load(config_path.read_text())
        config["model"].update(
            {
                "source": "local",
                "path": str(model_dir),
                "trust_remote_code": True,
                "architecture": None,
            }
        )
        config_path.write_text(yaml.safe_dump(config))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the analysis built a model")

    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", forbidden)
    monkeypatch.setattr("strato_peft.dry_run.dry_run_report", forbidden)
    runs, skipped = discover_runs(results, metric="eval_loss")
    assert len(runs) == 2 and not skipped
    assert {r.flops_source for r in runs} == {"cost model"}  # read from costs.json
    assert main(["compare", "--results-dir", str(results), "--metric", "eval_loss"]) == 0
    assert not marker.exists()


def test_fast_dev_runs_and_non_finite_scores_are_skipped_with_the_reason(
    two_seeds: Path,
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    results = tmp_path / "results"
    shutil.copytree(two_seeds, results)
    assert main(tiny_args("lora", gsm8k_dir, results, "--fast-dev-run", "--seed", "44")) == 0
    # an older fast dev run, in a real run's folder name: marked in its metrics.json
    older = results / "tiny_llama" / "gsm8k" / "lora_rank16_seed45"
    shutil.copytree(results / "tiny_llama" / "gsm8k" / "lora_rank16_seed44_fast-dev-run", older)
    # a diverged run whose loss is NaN
    nan = results / "tiny_llama" / "gsm8k" / "lora_rank16_seed46"
    shutil.copytree(results / "tiny_llama" / "gsm8k" / "lora_rank16_seed42", nan)
    metrics = json.loads((nan / "metrics.json").read_text())
    metrics["final"]["eval_loss"] = float("nan")
    (nan / "metrics.json").write_text(json.dumps(metrics))
    runs, skipped = discover_runs(results, metric="eval_loss")
    assert sorted(r.seed for r in runs) == [42, 43]
    reasons = {s.folder.name: s.reason for s in skipped}
    assert "fast-dev-run" in reasons["lora_rank16_seed44_fast-dev-run"]
    assert "fast-dev-run" in reasons["lora_rank16_seed45"]
    assert "not a finite number" in reasons["lora_rank16_seed46"]
    (lora,) = compare_runs(runs)
    assert lora.group.stats.n == 2
