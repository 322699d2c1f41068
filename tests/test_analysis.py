"""Experiment analysis through its public interface: real tiny run folders in, verdicts out.

Six real runs (LoRA and DoRA x seeds 42, 43, 44 on the tiny Llama) are trained once per
module; the verdict branches use copies of them whose metrics (and, for a smaller budget,
rank and params) are edited to known values, so every branch is hit deterministically.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from strato_peft.analysis.compare import (
    BASELINE,
    FAIL,
    NOT_ENOUGH_DATA,
    PASS,
    compare_runs,
)
from strato_peft.analysis.runs import discover_runs
from strato_peft.analysis.stats import compare_scores
from strato_peft.cli import main
from strato_peft.commands import analysis as commands
from tests.conftest import CONFIGS, ROOT
from tests.test_training import GSM8K_ROWS

SEEDS = (42, 43, 44)
METHODS = ("lora", "dora")


@pytest.fixture(scope="module")
def real_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real tiny runs (final task eval off: they have held-out loss, not accuracy)."""
    data = tmp_path_factory.mktemp("gsm8k")
    lines = [json.dumps(row) for row in GSM8K_ROWS]
    (data / "train.jsonl").write_text("\n".join(lines * 4) + "\n")
    (data / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    out = tmp_path_factory.mktemp("results")
    for method in METHODS:
        for seed in SEEDS:
            args = [
                "--config", str(CONFIGS / "experiments" / f"tiny_{method}.yaml"),
                "--override", f"task.data_path={data}",
                "--override", f"output.dir={out}",
                "--override", f"logging.log_dir={out}/logs",
                "--override", "task.final_eval=false",
                "--no-wandb", "--seed", str(seed),
            ]  # fmt: skip
            assert main(args) == 0
    return out


def run_folder(root: Path, method: str, seed: int, rank: int = 16) -> Path:
    return root / "tiny_llama" / "gsm8k" / f"{method}_rank{rank}_seed{seed}"


def read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


def set_score(folder: Path, strict: float) -> None:
    """What a final evaluation would have written: GSM8K scores in [0, 1]."""
    metrics = read(folder / "metrics.json")
    metrics["task"] = {"strict-match": strict, "flexible-extract": strict, "acc": strict, "n": 100}
    write(folder / "metrics.json", metrics)


def copy_group(
    src_root: Path,
    dst_root: Path,
    method: str,
    rank: int,
    scores: dict[int, float],
    task: str = "gsm8k",
) -> None:
    """Copy real ``method`` rank-16 runs as ``rank`` runs (of ``task``) with the given scores."""
    for seed, strict in scores.items():
        dst = dst_root / "tiny_llama" / task / f"{method}_rank{rank}_seed{seed}"
        shutil.copytree(run_folder(src_root, method, seed), dst)
        config = yaml.safe_load((dst / "config.yaml").read_text())
        config["peft"]["rank"] = rank
        config["peft"]["alpha"] = 2 * rank
        config["task"]["name"] = task
        (dst / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        costs = read(dst / "costs.json")
        costs["trainable_params"] = costs["trainable_params"] * rank // 16
        write(dst / "costs.json", costs)
        set_score(dst, strict)


LORA = {42: 0.300, 43: 0.304, 44: 0.302}


@pytest.fixture(scope="module")
def scored_results(real_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the real runs with known scores, hitting every verdict and skip reason."""
    root = tmp_path_factory.mktemp("scored")
    for method in METHODS:
        for seed in SEEDS:
            shutil.copytree(run_folder(real_results, method, seed), run_folder(root, method, seed))
    for seed, strict in LORA.items():
        set_score(run_folder(root, "lora", seed), strict)
    for seed, strict in {42: 0.301, 43: 0.303, 44: 0.305}.items():  # DoRA rank 16: no cheaper
        set_score(run_folder(root, "dora", seed), strict)
    copy_group(real_results, root, "dora", 4, {42: 0.299, 43: 0.300, 44: 0.301})  # PASS
    copy_group(real_results, root, "dora", 8, {42: 0.290, 43: 0.292, 44: 0.291})  # guardrail
    copy_group(real_results, root, "dora", 2, {42: 0.310, 43: 0.320, 44: 0.330})  # std 1.0
    copy_group(real_results, root, "dora", 1, {42: 0.31})  # one seed
    copy_group(real_results, root, "dora", 4, {42: 0.5, 43: 0.5}, task="mmlu")  # no LoRA
    broken = root / "tiny_llama" / "gsm8k"
    shutil.copytree(run_folder(root, "lora", 42), broken / "lora_rank32_seed42")
    write(broken / "lora_rank32_seed42" / "status.json", {"status": "running"})
    shutil.copytree(run_folder(root, "lora", 43), broken / "lora_rank32_seed43")
    (broken / "lora_rank32_seed43" / "metrics.json").write_text('{"final": {"eval_lo')
    shutil.copytree(run_folder(root, "lora", 44), broken / "lora_rank32_seed44")
    (broken / "lora_rank32_seed44" / "costs.json").unlink()
    (broken / "lora_rank32_seed45").mkdir()
    write(broken / "lora_rank32_seed45" / "status.json", {"status": "failed", "error": "OOM"})
    return root


def test_table_numbers_match_a_direct_computation_from_the_run_folders(
    scored_results: Path,
) -> None:
    runs, _ = discover_runs(scored_results)
    rows = {(c.group.task, c.group.method, c.group.rank): c.as_row() for c in compare_runs(runs)}
    lora_params = read(run_folder(scored_results, "lora", 42) / "costs.json")["trainable_params"]
    for (task, method, rank), row in rows.items():
        folders = sorted((scored_results / "tiny_llama" / task).glob(f"{method}_rank{rank}_seed*"))
        scores = [100 * read(f / "metrics.json")["task"]["strict-match"] for f in folders]
        params = [read(f / "costs.json")["trainable_params"] for f in folders]
        assert row["seeds"] == [int(f.name.rpartition("seed")[2]) for f in folders]
        assert row["mean"] == pytest.approx(statistics.mean(scores))
        if len(scores) > 1:
            assert row["std"] == pytest.approx(statistics.stdev(scores))
        if task == "gsm8k" and method != "lora":
            assert row["params_ratio"] == pytest.approx(statistics.mean(params) / lora_params)
            assert row["difference"] == pytest.approx(statistics.mean(scores) - 100 * 0.302)
    # FLOPs come from the cost model on each run's config, close to the measured count.
    dora = next(c for c in compare_runs(runs) if (c.group.method, c.group.rank) == ("dora", 16))
    measured = [read(r.folder / "costs.json")["train_flops_per_step"] for r in dora.group.runs]
    base = [read(r.folder / "costs.json")["train_flops_per_step"] for r in dora.baseline.runs]  # type: ignore[union-attr]
    assert dora.group.runs[0].flops_source == "cost model"
    assert dora.flops_ratio == pytest.approx(
        statistics.mean(measured) / statistics.mean(base), rel=0.02
    )


def test_every_verdict_branch(scored_results: Path) -> None:
    runs, _ = discover_runs(scored_results)
    verdicts = {(c.group.task, c.group.method, c.group.rank): c for c in compare_runs(runs)}
    assert verdicts[("gsm8k", "lora", 16)].verdict == BASELINE
    passed = verdicts[("gsm8k", "dora", 4)]
    assert passed.verdict == PASS, passed.reasons
    assert passed.checks == {"efficiency": True, "guardrail": True, "stability": True}
    assert passed.params_ratio == pytest.approx(0.25, abs=0.01)
    costly = verdicts[("gsm8k", "dora", 16)]
    assert costly.verdict == FAIL and costly.checks["efficiency"] is False
    assert costly.checks["guardrail"] and costly.checks["stability"]
    below = verdicts[("gsm8k", "dora", 8)]
    assert below.verdict == FAIL and below.checks["guardrail"] is False
    assert "guardrail FAILS: 29.10 vs LoRA 30.20 - 0.5" in below.reasons[1]
    unstable = verdicts[("gsm8k", "dora", 2)]
    assert unstable.verdict == FAIL and unstable.checks["stability"] is False
    assert unstable.checks["guardrail"] and unstable.checks["efficiency"]
    one_seed = verdicts[("gsm8k", "dora", 1)]
    assert one_seed.verdict == NOT_ENOUGH_DATA
    assert one_seed.reasons == ["dora rank1 has 1 seed(s), needs 2"]
    no_lora = verdicts[("mmlu", "dora", 4)]
    assert no_lora.verdict == NOT_ENOUGH_DATA and no_lora.baseline is None
    assert no_lora.reasons == ["no LoRA baseline for tiny_llama/mmlu"]


def test_incomplete_and_corrupt_folders_are_skipped_with_reasons(scored_results: Path) -> None:
    runs, skipped = discover_runs(scored_results)
    reasons = {s.folder.name: s.reason for s in skipped}
    assert reasons == {
        "lora_rank32_seed42": "status is 'running', not 'complete'",
        "lora_rank32_seed43": reasons["lora_rank32_seed43"],
        "lora_rank32_seed44": "costs.json is missing",
        "lora_rank32_seed45": "status is 'failed', not 'complete'",
    }
    assert reasons["lora_rank32_seed43"].startswith("metrics.json is unreadable")
    assert all(r.rank != 32 for r in runs)  # none of them enters an average


def test_held_out_loss_is_the_secondary_score_of_real_runs(real_results: Path) -> None:
    runs, skipped = discover_runs(real_results)
    assert runs == [] and len(skipped) == 6  # final eval off: no strict-match to score
    assert "task.final_eval" in skipped[0].reason
    runs, skipped = discover_runs(real_results, metric="eval_loss")
    assert skipped == [] and len(runs) == 6
    comparisons = compare_runs(runs)
    lora = next(c for c in comparisons if c.group.method == "lora")
    losses = [
        read(run_folder(real_results, "lora", s) / "metrics.json")["final"]["eval_loss"]
        for s in SEEDS
    ]
    assert lora.group.stats.mean == pytest.approx(-100 * statistics.mean(losses))
    dora = next(c for c in comparisons if c.group.method == "dora")
    assert dora.difference is not None and dora.difference.test == "paired t-test"


def test_paired_test_and_bootstrap_interval() -> None:
    from scipy import stats

    method, baseline = {42: 31.0, 43: 30.2, 44: 31.5}, {42: 30.0, 43: 30.1, 44: 30.4}
    diff = compare_scores(method, baseline)
    expected = stats.ttest_rel([31.0, 30.2, 31.5], [30.0, 30.1, 30.4])
    assert diff.test == "paired t-test" and diff.n == 3
    assert diff.p_value == pytest.approx(expected.pvalue)
    assert diff.mean == pytest.approx((1.0 + 0.1 + 1.1) / 3)
    assert diff.ci_low is not None and diff.ci_high is not None
    assert 0.1 - 1e-9 <= diff.ci_low <= diff.mean <= diff.ci_high <= 1.1 + 1e-9
    assert compare_scores(method, baseline) == diff  # fixed generator: reproducible
    welch = compare_scores({1: 1.0, 2: 2.0}, {3: 0.0, 4: 0.5})
    assert welch.test == "Welch t-test"
    assert welch.p_value == pytest.approx(stats.ttest_ind([1, 2], [0, 0.5], equal_var=False).pvalue)
    same = compare_scores({1: 2.0, 2: 3.0}, {1: 1.0, 2: 2.0})
    assert same.p_value is None and same.ci_low == same.ci_high == pytest.approx(1.0)
    assert math.isnan(compare_scores({}, {1: 1.0}).mean)


def test_compare_and_stats_commands(
    scored_results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert commands.compare(["--results_dir", str(scored_results), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {row["verdict"] for row in data["comparisons"]} == {
        BASELINE,
        PASS,
        FAIL,
        NOT_ENOUGH_DATA,
    }
    assert len(data["skipped"]) == 4
    assert commands.compare(["--results-dir", str(scored_results)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "NOT ENOUGH DATA" in text and "status is 'running'" in text
    assert commands.stats(["--results_dir", str(scored_results)]) == 0
    text = capsys.readouterr().out
    assert "paired t-test over 3 seeds" in text
    assert commands.compare(["--results_dir", str(scored_results / "nowhere")]) == 1


def test_scripts_run_from_a_checkout(scored_results: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), "--results_dir",
         str(scored_results), "--json", "--no-cost-model"],
        capture_output=True, text=True, cwd=scored_results, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["comparisons"]
    assert {r["verdict"] for r in rows} == {BASELINE, PASS, FAIL, NOT_ENOUGH_DATA}
