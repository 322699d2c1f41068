"""Analysis subcommands: ``compare``, ``stats``, ``visualize``, ``report``, ``run-experiments``,
``analyze-profile``, ``analyze-logs``.

Each is ``NAME(argv) -> exit code``; ``scripts/<name>.py`` and ``strato-peft <name>`` call
the same function. Flags accept the product spec's spelling (``--results_dir``) and the
dashed one (``--results-dir``). Heavy imports (matplotlib, scipy, torch) happen inside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_RESULTS = "results"


def _results_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--results_dir", "--results-dir", dest="results_dir", default=DEFAULT_RESULTS,
        help="folder holding run folders, searched recursively (default: results/)",
    )  # fmt: skip
    parser.add_argument(
        "--metric",
        default="primary",
        help="score: 'primary' (per task: gsm8k strict-match, mmlu acc, humaneval pass@1, "
        "alpaca eval_loss), 'eval_loss', or a task metric such as flexible-extract",
    )
    parser.add_argument(
        "--no-cost-model",
        action="store_true",
        help="use the measured costs.json FLOPs instead of the cost model",
    )
    return parser


def _load(args: argparse.Namespace) -> tuple[list[Any], list[Any]] | None:
    from strato_peft.analysis.runs import discover_runs

    try:
        return discover_runs(args.results_dir, args.metric, cost_model=not args.no_cost_model)
    except FileNotFoundError as exc:
        print(f"{exc}", file=sys.stderr)
        return None


def _skipped_json(skipped: list[Any]) -> list[dict[str, str]]:
    return [{"folder": str(s.folder), "reason": s.reason} for s in skipped]


def compare(argv: list[str]) -> int:
    """Comparison table and PASS / FAIL / INCONCLUSIVE / NOT ENOUGH DATA verdicts against LoRA."""
    parser = _results_parser(
        "compare", "Compare every method/budget with LoRA and judge the spec's success criteria."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--goal", metavar="METHOD", default=None,
        help="also judge the stricter goal of a searched method against its controls "
        "(METHOD-band, METHOD-random ...): cost caps on params and FLOPs, search cost, "
        "the guardrail, loss vs LoRA and vs each control (e.g. --goal strato)",
    )  # fmt: skip
    parser.add_argument("--goal-params", type=_positive, default=0.5, metavar="X",
                        help="goal: params <= X times LoRA's (default 0.5)")  # fmt: skip
    parser.add_argument("--goal-flops", type=_positive, default=0.8, metavar="X",
                        help="goal: FLOPs per step <= X times LoRA's (default 0.8)")  # fmt: skip
    parser.add_argument("--goal-search-cost", type=_positive, default=2.0, metavar="X",
                        help="goal: search <= X LoRA trainings in step equivalents (default 2)")  # fmt: skip
    args = parser.parse_args(argv)
    loaded = _load(args)
    if loaded is None:
        return 1
    from strato_peft.analysis.compare import compare_runs, markdown_table
    from strato_peft.analysis.console import (
        make_console,
        print_comparisons,
        print_goal,
        print_skipped,
    )
    from strato_peft.analysis.goal import Goal, judge_goal

    runs, skipped = loaded
    comparisons = compare_runs(runs)
    goal = []
    if args.goal:
        spec = Goal(method=args.goal, params_ratio=args.goal_params,
                    flops_ratio=args.goal_flops, search_cost_ratio=args.goal_search_cost)  # fmt: skip
        goal = judge_goal(runs, spec)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(comparisons) + "\n")
    if args.json:
        out: dict[str, Any] = {"comparisons": [c.as_row() for c in comparisons]}
        if args.goal:
            out["goal"] = [g.as_row() for g in goal]
        out["skipped"] = _skipped_json(skipped)
        print(json.dumps(out, default=str))
        return 0
    console = make_console()
    if not runs:
        console.print(f"no complete runs under {args.results_dir}")
    else:
        print_comparisons(console, comparisons)
        if args.goal:
            print_goal(console, goal, args.goal)
    print_skipped(console, skipped)
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def stats(argv: list[str]) -> int:
    """Per group: mean, std over seeds; per comparison: paired t-test and bootstrap CI."""
    parser = _results_parser(
        "statistical_analysis", "Seed statistics and significance of each method vs LoRA."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    loaded = _load(args)
    if loaded is None:
        return 1
    from strato_peft.analysis.compare import compare_runs, fmt
    from strato_peft.analysis.console import make_console, print_skipped

    runs, skipped = loaded
    comparisons = compare_runs(runs)
    if args.json:
        rows = []
        for c in comparisons:
            row = c.as_row()
            rows.append({k: row[k] for k in (
                "model", "task", "method", "budget", "metric", "seeds", "n", "mean", "std",
                "baseline", "baseline_mean", "difference", "test", "p_value", "ci_low",
                "ci_high", "sentence",
            )})  # fmt: skip
        print(json.dumps({"groups": rows, "skipped": _skipped_json(skipped)}, default=str))
        return 0
    console = make_console()
    for c in comparisons:
        s = c.group.stats
        scores = ", ".join(f"{seed}: {c.group.scores[seed]:.2f}" for seed in s.seeds)
        console.print(
            f"[bold]{c.group.model}/{c.group.task} {c.group.label}[/] ({c.group.metric}, points): "
            f"mean {fmt(s.mean)}, std {fmt(s.std)} over {s.n} seed(s) [{scores}]",
            highlight=False,
        )
        if c.sentence:
            console.print(f"  {c.sentence}", highlight=False)
    if not runs:
        console.print(f"no complete runs under {args.results_dir}")
    print_skipped(console, skipped)
    return 0


def visualize(argv: list[str]) -> int:
    """PNG figures: score vs params and vs FLOPs, training curves, rank heatmaps."""
    parser = _results_parser("visualize_results", "Plot the runs of a results folder.")
    parser.add_argument(
        "--output_dir", "--output-dir", dest="output_dir", type=Path, default=None,
        help="where to write the PNGs (default: <results_dir>/figures)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    loaded = _load(args)
    if loaded is None:
        return 1
    from strato_peft.analysis.console import make_console, print_skipped
    from strato_peft.analysis.plots import all_figures, save_all

    runs, skipped = loaded
    console = make_console()
    out = args.output_dir or Path(args.results_dir) / "figures"
    paths = save_all(all_figures(runs), out)
    for path in paths:
        console.print(f"wrote {path}", highlight=False)
    if not paths:
        console.print(f"no complete runs under {args.results_dir}: nothing to plot")
    print_skipped(console, skipped)
    return 0


def report(argv: list[str]) -> int:
    """One self-contained HTML report (figures inlined) and its Markdown twin."""
    parser = _results_parser(
        "generate_report", "Write report.html and report.md for a results folder."
    )
    parser.add_argument(
        "--output", type=Path, default=None,
        help="report path without suffix (default: <results_dir>/report)",
    )  # fmt: skip
    parser.add_argument("--title", default="STRATO-PEFT results")
    args = parser.parse_args(argv)
    loaded = _load(args)
    if loaded is None:
        return 1
    from strato_peft.analysis.compare import compare_runs
    from strato_peft.analysis.console import make_console, print_skipped
    from strato_peft.analysis.plots import all_figures, png_bytes
    from strato_peft.analysis.report import build_report, write_report

    runs, skipped = loaded
    import matplotlib.pyplot as plt

    figures = {}
    for stem, fig in all_figures(runs).items():
        figures[stem] = png_bytes(fig)
        plt.close(fig)
    built = build_report(runs, skipped, compare_runs(runs), figures, title=args.title)
    html_path, md_path = write_report(
        built, figures, args.output or Path(args.results_dir) / "report"
    )
    console = make_console()
    console.print(f"wrote {html_path} and {md_path}", highlight=False)
    print_skipped(console, skipped)
    return 0


def analyze_profile(argv: list[str]) -> int:
    """Top operators of the ``--profile`` traces."""
    parser = argparse.ArgumentParser(
        prog="analyze_profile", description="Summarise torch.profiler traces by operator."
    )
    parser.add_argument(
        "--profile_dir", "--profile-dir", dest="profile_dir", type=Path,
        default=Path("logs/profiles"), help="folder of *.pt.trace.json files (default: logs/profiles)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=20, help="how many operators to list")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    from strato_peft.analysis.console import make_console
    from strato_peft.analysis.logs import profile_summary

    if not args.profile_dir.is_dir():
        print(f"profile directory {args.profile_dir} does not exist", file=sys.stderr)
        return 1
    summary = profile_summary(args.profile_dir)
    top = summary.ops[: args.top]
    if args.json:
        print(json.dumps({
            "traces": [str(p) for p in summary.traces],
            "unreadable": [{"file": str(p), "reason": r} for p, r in summary.unreadable],
            "total_us": summary.total_us,
            "ops": [{"name": o.name, "category": o.category, "calls": o.calls,
                     "total_us": o.total_us, "mean_us": o.mean_us} for o in top],
        }))  # fmt: skip
        return 0 if summary.traces else 1
    from rich.table import Table

    console = make_console()
    if not summary.traces:
        console.print(f"no readable traces under {args.profile_dir} (run with --profile)")
    table = Table(title=f"{len(summary.traces)} trace(s), top {len(top)} operators by total time")
    for column in ("operator", "category", "calls", "total ms", "mean us"):
        table.add_column(column, justify="left" if column in ("operator", "category") else "right")
    for op in top:
        table.add_row(op.name, op.category, str(op.calls), f"{op.total_us / 1e3:.2f}",
                      f"{op.mean_us:.1f}")  # fmt: skip
    console.print(table)
    console.print("times are inclusive: an operator's time contains the operators it calls")
    for path, reason in summary.unreadable:
        console.print(f"[yellow]unreadable[/] {path}: {reason}", highlight=False)
    return 0 if summary.traces else 1


def analyze_logs(argv: list[str]) -> int:
    """Levels, runs, warnings and errors of a ``training.log``."""
    parser = argparse.ArgumentParser(prog="analyze_logs", description="Summarise a training.log.")
    parser.add_argument(
        "--log_file", "--log-file", dest="log_file", type=Path, default=Path("logs/training.log"),
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    from strato_peft.analysis.console import make_console
    from strato_peft.analysis.logs import log_summary

    if not args.log_file.is_file():
        print(f"log file {args.log_file} does not exist", file=sys.stderr)
        return 1
    s = log_summary(args.log_file)
    if args.json:
        print(json.dumps({
            "lines": s.lines, "levels": dict(s.levels), "first": s.first, "last": s.last,
            "started": s.started, "completed": s.completed, "failed": s.failed,
            "problems": s.problems,
        }))  # fmt: skip
        return 0
    console = make_console()
    levels = ", ".join(f"{k} {v}" for k, v in sorted(s.levels.items()))
    console.print(
        f"{args.log_file}: {s.lines} lines ({levels}); {s.first} .. {s.last}", highlight=False
    )
    console.print(
        f"runs started {len(s.started)}, completed {len(s.completed)}, failed {len(s.failed)}",
        highlight=False,
    )
    unfinished = [r for r in dict.fromkeys(s.started) if r not in s.completed]
    for run in unfinished:
        console.print(f"  not completed: {run}", highlight=False)
    for line in s.failed:
        console.print(f"  [red]{line}[/]", highlight=False)
    if s.problems:
        console.print(f"{len(s.problems)} warning/error line(s):")
        for line in s.problems[-20:]:
            console.print(f"  {line}", highlight=False, soft_wrap=True)
    return 0


def run_experiments(argv: list[str]) -> int:
    """Every experiment YAML of a folder x seeds; complete runs skipped, failures retried once."""
    from strato_peft.analysis.batch import DEFAULT_SEEDS

    parser = argparse.ArgumentParser(
        prog="run_experiments",
        description="Run every experiment config in a folder for each seed (resumable).",
    )
    parser.add_argument(
        "--config_dir", "--config-dir", dest="config_dir", type=Path,
        default=Path("configs/experiments"),
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument(
        "--filter", action="append", default=[], metavar="PATTERN",
        help="only configs whose name contains PATTERN or matches the glob; repeatable",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    parser.add_argument(
        "--retries", type=int, default=1, help="retries of a failed run (default 1)"
    )
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="passed to every run (e.g. output.dir=...)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    return _run_batch(args)


def _run_batch(args: argparse.Namespace, runner: Any = None) -> int:
    from rich.table import Table

    from strato_peft.analysis import batch
    from strato_peft.analysis.console import make_console

    console = make_console()
    configs = batch.find_configs(args.config_dir, args.filter)
    if not configs:
        console.print(f"no experiment configs in {args.config_dir} match {args.filter or '*'}")
        return 1
    jobs = batch.plan_jobs(configs, tuple(args.seeds), args.override)
    if args.dry_run:
        for job in jobs:
            if job.status == "pending":
                job.status = batch.WOULD_RUN
    else:

        def progress(index: int, total: int, job: batch.Job) -> None:
            console.rule(f"[{index}/{total}] {job.label}")

        batch.run_jobs(jobs, runner or batch.subprocess_runner, args.retries, progress)
    table = Table(title=f"{len(jobs)} run(s): {len(configs)} config(s) x seeds {args.seeds}")
    for column in ("config", "seed", "status", "attempts", "time", "run folder / error"):
        table.add_column(column)
    for job in jobs:
        detail = job.error or (str(job.run_dir) if job.run_dir else "")
        table.add_row(job.config.stem, str(job.seed), job.status, str(job.attempts),
                      f"{job.seconds:.0f}s" if job.attempts else "", detail)  # fmt: skip
    console.print(table)
    failed = [j for j in jobs if j.status in (batch.FAILED, batch.INVALID)]
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed[/]: " + ", ".join(j.label for j in failed))
    return 1 if failed else 0
