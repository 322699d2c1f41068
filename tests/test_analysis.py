"""Experiment analysis through its public interface: real tiny run folders in, verdicts out.

Six real runs (LoRA and DoRA x seeds 42, 43, 44 on the tiny Llama) are trained once per
module; the verdict branches use copies of them whose metrics (and, for a smaller budget,
rank and params) are edited to known values, so every branch is hit deterministically.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from strato_peft.analysis import batch
from strato_peft.analysis.compare import (
    BASELINE,
    FAIL,
    INCONCLUSIVE,
    NOT_ENOUGH_DATA,
    PASS,
    compare_runs,
)
from strato_peft.analysis.logs import log_summary, profile_summary
from strato_peft.analysis.plots import all_figures, rank_matrix
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
                "--override", "training.max_steps=2",  # two steps: a curve, in half the time
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
RANK_PATTERN = {
    "model.layers.0.self_attn.q_proj": 4,
    "model.layers.0.self_attn.v_proj": 2,
    "model.layers.1.self_attn.q_proj": [True, False, True],  # AdaLoRA stores masks
}


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
    copy_group(real_results, root, "dora", 4, {42: 0.300, 43: 0.303, 44: 0.302})  # PASS
    copy_group(real_results, root, "dora", 6, {42: 0.300, 43: 0.296, 44: 0.300})  # straddles
    copy_group(real_results, root, "dora", 8, {42: 0.290, 43: 0.292, 44: 0.291})  # guardrail
    copy_group(real_results, root, "dora", 2, {42: 0.310, 43: 0.320, 44: 0.330})  # std 1.0
    copy_group(real_results, root, "dora", 1, {42: 0.31})  # one seed
    copy_group(real_results, root, "dora", 4, {42: 0.5, 43: 0.5}, task="mmlu")  # no LoRA
    adapter_config = run_folder(root, "dora", 42, 4) / "adapter" / "adapter_config.json"
    config = read(adapter_config)
    config["rank_pattern"] = RANK_PATTERN
    write(adapter_config, config)
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
    assert costly.checks["stability"]  # its paired interval is wider than 0.5: undecided
    assert costly.checks["guardrail"] is None
    below = verdicts[("gsm8k", "dora", 8)]
    assert below.verdict == FAIL and below.checks["guardrail"] is False
    assert below.reasons[1].startswith("guardrail FAILS: 29.10 vs LoRA 30.20, difference -1.10 [")
    undecided = verdicts[("gsm8k", "dora", 6)]  # the paired interval straddles -0.5 points
    assert undecided.verdict == INCONCLUSIVE and undecided.checks["guardrail"] is None
    assert undecided.difference is not None and undecided.difference.ci_low < -0.5
    unstable = verdicts[("gsm8k", "dora", 2)]
    assert unstable.verdict == FAIL and unstable.checks["stability"] is False
    assert unstable.checks["efficiency"] and unstable.checks["guardrail"] is None
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
    # Student-t interval of the paired differences (1.0, 0.1, 1.1): mean -+ t(0.975, 2) se
    half = stats.t.ppf(0.975, 2) * statistics.stdev([1.0, 0.1, 1.1]) / math.sqrt(3)
    assert (diff.ci_low, diff.ci_high) == pytest.approx((diff.mean - half, diff.mean + half))
    assert diff.ci_low < 0.1  # wider than the bootstrap's range of three differences
    assert compare_scores(method, baseline) == diff
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
        INCONCLUSIVE,
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
    assert {r["verdict"] for r in rows} == {BASELINE, PASS, FAIL, INCONCLUSIVE, NOT_ENOUGH_DATA}


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables = 0
        self.images: list[bytes] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tables += tag == "table"
        src = dict(attrs).get("src") or ""
        if tag == "img" and src.startswith("data:image/png;base64,"):
            self.images.append(base64.b64decode(src.partition(",")[2]))


def _png_pixels(data: bytes) -> Any:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail(f"headless Chromium is needed to render the report: {CHROMIUM_HINT}")


CHROMIUM_HINT = "apt-get update && apt-get install -y chromium"


def test_report_is_self_contained_html_that_chromium_renders(
    scored_results: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    assert commands.report(["--results_dir", str(scored_results), "--output", str(out)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<script" not in page and "http" not in page.split("<h2>Runs")[0]
    parser = _Images()
    parser.feed(page)
    assert parser.tables == 1
    stems = {"score_vs_params", "score_vs_flops", "training_curves"}
    assert len(parser.images) == len(stems) + 1  # + the rank heatmap of the patterned run
    for png in parser.images:
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        height, width = _png_pixels(png).shape[:2]
        assert width >= 400 and height >= 200
    for verdict in ("PASS", "FAIL", "NOT ENOUGH DATA", "status is &#x27;running&#x27;"):
        assert verdict in page
    assert "config.yaml" in page and "git_commit" in page  # each run's config and environment
    markdown = (tmp_path / "report.md").read_text()
    assert "| gsm8k | dora | rank4 |" in markdown and "figures/score_vs_params.png" in markdown
    assert (tmp_path / "figures" / "score_vs_params.png").stat().st_size > 10_000

    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={shot}",
         "--window-size=1280,2000", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.exists(), result.stderr[-2000:]
    pixels = _png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (2000, 1280)
    colors = {tuple(p) for p in pixels[::16, ::16].reshape(-1, pixels.shape[2]).tolist()}
    assert len(colors) > 20  # text, table shading and plots, not a blank page


def test_figures_include_a_rank_heatmap_for_per_module_ranks(scored_results: Path) -> None:
    import matplotlib.pyplot as plt

    layers, modules, matrix = rank_matrix(
        {k: v for k, v in RANK_PATTERN.items() if isinstance(v, int)}
        | {"model.layers.1.self_attn.q_proj": 2}
    )
    assert (layers, modules) == ([0, 1], ["q_proj", "v_proj"])
    assert matrix[0] == [4.0, 2.0] and matrix[1][0] == 2.0 and math.isnan(matrix[1][1])
    runs, _ = discover_runs(scored_results)
    patterned = [r for r in runs if r.rank_pattern]
    assert len(patterned) == 1 and patterned[0].rank_pattern == {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 2,
        "model.layers.1.self_attn.q_proj": 2,
    }
    figures = all_figures(runs)
    assert set(figures) == {
        "score_vs_params", "score_vs_flops", "training_curves",
        "ranks_tiny_llama_gsm8k_dora_rank4_seed42",
    }  # fmt: skip
    for fig in figures.values():
        plt.close(fig)


def test_visualize_command_writes_pngs(scored_results: Path, tmp_path: Path) -> None:
    assert (
        commands.visualize(["--results_dir", str(scored_results), "--output_dir", str(tmp_path)])
        == 0
    )
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "ranks_tiny_llama_gsm8k_dora_rank4_seed42.png",
        "score_vs_flops.png",
        "score_vs_params.png",
        "training_curves.png",
    ]


def test_log_summary_of_real_and_broken_logs(real_results: Path, tmp_path: Path) -> None:
    real = log_summary(real_results / "logs" / "training.log")
    assert len(real.started) == 6 and len(real.completed) == 6 and not real.failed
    log = tmp_path / "training.log"
    log.write_text(
        "2026-01-01 10:00:00,001 INFO strato_peft.training.run: run results/a/b/lora_rank16_seed42 (tag)\n"
        "2026-01-01 10:00:05,000 WARNING strato_peft.training.loop: loss is nan at step 3\n"
        "2026-01-01 10:00:06,000 ERROR strato_peft.training.run: run failed: RuntimeError: boom\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1\n'
    )
    s = log_summary(log)
    assert s.levels == {"INFO": 1, "WARNING": 1, "ERROR": 1}
    assert s.started == ["results/a/b/lora_rank16_seed42"] and s.completed == []
    assert s.failed == ["run failed: RuntimeError: boom"]
    assert s.problems[1].endswith('File "x.py", line 1')
    assert commands.analyze_logs(["--log_file", str(log)]) == 0
    assert commands.analyze_logs(["--log_file", str(tmp_path / "missing.log")]) == 1


def test_profile_summary_totals_operators(tmp_path: Path) -> None:
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 30.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 10.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "dur": 5.0},
        {"ph": "X", "cat": "python_function", "name": "forward", "dur": 99.0},
        {"ph": "i", "cat": "cpu_op", "name": "marker"},
    ]
    write(tmp_path / "host_epoch0.1.pt.trace.json", {"traceEvents": events})
    (tmp_path / "host_epoch1.2.pt.trace.json").write_text("{truncated")
    s = profile_summary(tmp_path)
    assert [(o.name, o.calls, o.total_us) for o in s.ops] == [
        ("aten::mm", 2, 40.0),
        ("aten::add", 1, 5.0),
    ]
    assert len(s.traces) == 1 and s.unreadable[0][0].name == "host_epoch1.2.pt.trace.json"
    assert commands.analyze_profile(["--profile_dir", str(tmp_path)]) == 0
    assert commands.analyze_profile(["--profile_dir", str(tmp_path / "none")]) == 1


def test_batch_skips_complete_runs_retries_failures_once_and_reports(
    real_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiments = CONFIGS / "experiments"
    results = tmp_path / "results"
    shutil.copytree(real_results, results)
    overrides = [f"output.dir={results}"]
    assert batch.find_configs(experiments, ["tiny_[ld]ora"]) == [
        experiments / "tiny_dora.yaml",
        experiments / "tiny_lora.yaml",
    ]
    assert commands.run_experiments(
        ["--config_dir", str(experiments), "--filter", "tiny_lor[a]", "--filter", "tiny_dor[a]",
         "--seeds", "42", "45", "--dry-run", "--override", overrides[0]]
    ) == 0  # fmt: skip
    listing = capsys.readouterr().out
    assert listing.count("skipped (complete)") == 2 and listing.count("would run") == 2

    jobs = batch.plan_jobs(
        batch.find_configs(experiments, ["tiny_lor[a]", "tiny_dor[a]"]), (44, 45), overrides
    )
    assert [j.status for j in jobs] == [batch.SKIPPED, "pending", batch.SKIPPED, "pending"]
    calls: list[list[str]] = []

    def runner(command: list[str]) -> int:
        calls.append(command)
        job = next(j for j in jobs if j.command == command)
        assert job.run_dir is not None
        job.run_dir.mkdir(parents=True, exist_ok=True)
        if "tiny_dora" in command[command.index("--config") + 1]:
            write(job.run_dir / "status.json", {"status": "failed", "error": "OOM"})
            return 1
        if len([c for c in calls if c == command]) == 2:  # LoRA: fails once, then completes
            write(job.run_dir / "status.json", {"status": "complete"})
            return 0
        return 1

    batch.run_jobs(jobs, runner)
    by_label = {j.label: j for j in jobs}
    assert by_label["tiny_lora seed 45"].status == batch.RETRIED
    assert by_label["tiny_dora seed 45"].status == batch.FAILED
    assert by_label["tiny_dora seed 45"].attempts == 2
    assert by_label["tiny_dora seed 45"].error == "exit code 1: OOM"
    assert calls[0][1:4] == ["-m", "strato_peft.cli", "--config"]
    assert calls[0][-4:] == ["--seed", "45", "--override", f"output.dir={results}"]
    # The batch, started again, skips what completed.
    again = batch.plan_jobs(batch.find_configs(experiments, ["tiny_lora"]), (45,), overrides)
    assert again[0].status == batch.SKIPPED


ANALYSIS_SUBCOMMANDS = {
    "run-experiments": "run_experiments",
    "compare": "compare",
    "stats": "stats",
    "visualize": "visualize",
    "report": "report",
    "analyze-profile": "analyze_profile",
    "analyze-logs": "analyze_logs",
}


def test_strato_peft_subcommands_reach_the_same_functions(
    scored_results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from strato_peft import cli

    for name, function in ANALYSIS_SUBCOMMANDS.items():
        assert callable(getattr(commands, function))
        entry = (f"strato_peft.commands.analysis:{function}", "analysis")
        monkeypatch.setitem(cli.SUBCOMMANDS, name, cli.SUBCOMMANDS.get(name, entry))
        assert cli.SUBCOMMANDS[name][0] == entry[0]
    assert cli.main(["compare", "--results_dir", str(scored_results), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["skipped"]) == 4


def test_strato_budget_includes_lambda_and_uses_measured_flops_without_a_cost_model_figure(
    scored_results: Path, tmp_path: Path
) -> None:
    """A folder without the cost model's figure in costs.json (written before it existed)
    falls back to the measured FLOPs."""
    for seed in (42, 43):
        shutil.copytree(
            run_folder(scored_results, "lora", seed), run_folder(tmp_path, "lora", seed)
        )
        dst = tmp_path / "tiny_llama" / "gsm8k" / f"strato_rank16_lambda0.1_seed{seed}"
        shutil.copytree(run_folder(scored_results, "lora", seed), dst)
        config = yaml.safe_load((dst / "config.yaml").read_text())
        config["peft"]["method"] = "strato"
        config["peft"]["strato"]["lambda"] = 0.1
        (dst / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        costs = read(dst / "costs.json")
        del costs["cost_model_train_flops_per_step"]
        write(dst / "costs.json", costs)
    runs, skipped = discover_runs(tmp_path)
    assert not skipped
    strato = next(c for c in compare_runs(runs) if c.group.method == "strato")
    assert strato.group.budget == "rank16_lambda0.1" and strato.baseline is not None
    assert {r.flops_source for r in strato.group.runs} == {"measured (FlopCounterMode)"}
    assert strato.group.flops == read(dst / "costs.json")["train_flops_per_step"]


def test_the_guardrail_is_inconclusive_when_every_run_scores_zero() -> None:
    from strato_peft.analysis.compare import Group, guardrail

    def group(method: str, scores: dict[int, float]) -> Group:
        runs = [_fake_run(method, seed, score) for seed, score in scores.items()]
        return Group("m", "gsm8k", method, "rank16", runs)

    zeros = {42: 0.0, 43: 0.0, 44: 0.0}
    diff = compare_scores(zeros, zeros)
    assert guardrail(group("strato", zeros), group("lora", zeros), diff, 0.5) is None
    better = {42: 1.0, 43: 1.05, 44: 1.1}
    diff = compare_scores(better, zeros)
    assert guardrail(group("strato", better), group("lora", zeros), diff, 0.5) is True
    wide = {42: 2.0, 43: 3.0, 44: 4.0}  # above -0.5 but an interval far wider than 0.5
    diff = compare_scores(wide, zeros)
    assert diff.ci_low is not None and diff.ci_low > -0.5
    assert guardrail(group("strato", wide), group("lora", zeros), diff, 0.5) is None


def _fake_run(method: str, seed: int, score: float) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(method=method, seed=seed, score=score)


def _goal_run(method: str, seed: int, loss: float, **extra: Any) -> Any:
    from types import SimpleNamespace

    fields = {
        "model": "m", "task": "gsm8k", "method": method, "rank": 16, "budget": "rank16",
        "seed": seed, "score": 70.0 - 10 * loss, "eval_loss": loss, "metric": "token_accuracy",
        "trainable_params": 1000, "flops_per_step": 100.0, "search_cost": {},
    }  # fmt: skip
    fields.update(extra)
    fields["group_key"] = (fields["model"], fields["task"], method, fields["budget"])
    return SimpleNamespace(**fields)


def test_the_goal_judges_cost_search_cost_and_loss_against_each_control() -> None:
    from strato_peft.analysis.goal import MET, NOT_MET, Goal, judge_goal

    seeds = (42, 43, 44)
    lora = [_goal_run("lora", s, 1.25 + 0.01 * i) for i, s in enumerate(seeds)]
    strato = [
        _goal_run("strato", s, 1.20 + 0.01 * i + (0.001 if i == 1 else 0), trainable_params=450,
                  flops_per_step=79.0, search_cost={"step_equivalents_ratio": 1.75})
        for i, s in enumerate(seeds)
    ]  # fmt: skip
    # random: worse than STRATO on every seed by about 0.03 -> STRATO is better
    rand = [_goal_run("strato-random", s, 1.23 + 0.01 * i) for i, s in enumerate(seeds)]
    # random-search: better than STRATO on every seed -> "better than" is NOT MET
    rsearch = [_goal_run("strato-random-search", s, 1.15 + 0.01 * i) for i, s in enumerate(seeds)]
    # band: noisy around STRATO -> "at least as good" is MET (the interval includes 0)
    band = [
        _goal_run("strato-band", s, loss) for s, loss in zip(seeds, (1.19, 1.22, 1.21), strict=True)
    ]
    checks = {c.check: c for c in judge_goal([*lora, *strato, *rand, *rsearch, *band])}
    assert checks["cost"].verdict == MET and "0.450x" in checks["cost"].detail
    assert checks["search cost"].verdict == MET
    assert checks["loss no worse than lora"].verdict == MET
    assert checks["better than random"].verdict == MET
    assert checks["better than random-search"].verdict == NOT_MET
    assert checks["at least as good as band"].verdict == MET
    assert checks["token_accuracy >= lora - 0.5 points"].verdict == MET
    # stricter caps and a missing control
    strict = Goal(params_ratio=0.4, search_cost_ratio=1.5, better_than=("uniform",))
    checks = {c.check: c for c in judge_goal([*lora, *strato, *band], strict)}
    assert checks["cost"].verdict == NOT_MET and checks["search cost"].verdict == NOT_MET
    assert checks["better than uniform"].verdict == "NOT ENOUGH DATA"
    # a STRATO worse than LoRA on every seed: the loss check fails
    worse = [_goal_run("strato", s, 1.30 + 0.01 * i, trainable_params=450, flops_per_step=79.0)
             for i, s in enumerate(seeds)]  # fmt: skip
    checks = {c.check: c for c in judge_goal([*lora, *worse])}
    assert checks["loss no worse than lora"].verdict == NOT_MET
    assert checks["search cost"].verdict == "NOT ENOUGH DATA"  # no search.json cost


def test_compare_goal_flags_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from strato_peft.commands.analysis import compare

    with pytest.raises(SystemExit) as exc:
        compare(["--results-dir", str(tmp_path), "--goal", "strato", "--goal-params", "-1"])
    assert exc.value.code == 2 and "must be > 0" in capsys.readouterr().err
