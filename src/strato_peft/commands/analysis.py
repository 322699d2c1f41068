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
    """Comparison table and PASS / FAIL / NOT ENOUGH DATA verdicts against LoRA."""
    parser = _results_parser(
        "compare", "Compare every method/budget with LoRA and judge the spec's success criteria."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    loaded = _load(args)
    if loaded is None:
        return 1
    from strato_peft.analysis.compare import compare_runs, markdown_table
    from strato_peft.analysis.console import make_console, print_comparisons, print_skipped

    runs, skipped = loaded
    comparisons = compare_runs(runs)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(comparisons) + "\n")
    if args.json:
        rows = [c.as_row() for c in comparisons]
        print(json.dumps({"comparisons": rows, "skipped": _skipped_json(skipped)}, default=str))
        return 0
    console = make_console()
    if not runs:
        console.print(f"no complete runs under {args.results_dir}")
    else:
        print_comparisons(console, comparisons)
    print_skipped(console, skipped)
    return 0


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
