"""Comparison against LoRA and the product spec's verdicts.

Runs are grouped by (model, task, method, budget), budget being the rank (and lambda
for STRATO); seeds are the repeats within a group. Every group is compared with the
LoRA group of the same model and task (same rank when there is one, else the
highest-rank LoRA group). The spec's success criteria:

* efficiency: trainable params <= 0.7 x LoRA's, or train FLOPs per step <= 0.8 x LoRA's;
* accuracy guardrail: the 95% interval of the paired score difference lies above
  -0.5 points and is no wider than 0.5 (INCONCLUSIVE when it straddles -0.5, is wider
  than the margin, or every run scores 0);
* stability: standard deviation of the score across seeds <= 0.4 points.

A group passes when all three hold, fails when one does not, is INCONCLUSIVE when the
guardrail cannot decide, and gets
``NOT ENOUGH DATA`` when it or its baseline has fewer than ``min_seeds`` seeds or
there is no LoRA baseline. LoRA groups are the baselines themselves.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from strato_peft.analysis.runs import Run
from strato_peft.analysis.stats import (
    Difference,
    GroupStats,
    compare_scores,
    describe_difference,
    group_stats,
)

PASS = "PASS"
FAIL = "FAIL"
INCONCLUSIVE = "INCONCLUSIVE"
NOT_ENOUGH_DATA = "NOT ENOUGH DATA"
BASELINE = "BASELINE"
DEFAULT_BASELINE = "lora"
"""The product spec compares every method with uniform LoRA: the run label's method of
the baseline groups (``Criteria.baseline`` changes it; nothing branches on a name)."""


@dataclass(frozen=True)
class Criteria:
    """The product spec's thresholds (points for scores)."""

    params_ratio: float = 0.7
    flops_ratio: float = 0.8
    guardrail_points: float = 0.5
    max_std_points: float = 0.4
    min_seeds: int = 2
    baseline: str = DEFAULT_BASELINE
    """The method (run label) every group is compared with."""


@dataclass
class Group:
    """The seeds of one (model, task, method, budget)."""

    model: str
    task: str
    method: str
    budget: str
    runs: list[Run]

    @property
    def label(self) -> str:
        return f"{self.method} {self.budget}"

    @property
    def rank(self) -> int:
        return self.runs[0].rank

    @property
    def metric(self) -> str:
        return self.runs[0].metric

    @property
    def params(self) -> float:
        return sum(r.trainable_params for r in self.runs) / len(self.runs)

    @property
    def flops(self) -> float | None:
        values = [r.flops_per_step for r in self.runs if r.flops_per_step is not None]
        return sum(values) / len(values) if values else None

    @property
    def scores(self) -> dict[int, float]:
        return {r.seed: r.score for r in self.runs}

    @property
    def stats(self) -> GroupStats:
        return group_stats(self.runs)


@dataclass
class Comparison:
    """One group against its baseline, with the verdict and why."""

    group: Group
    baseline: Group | None
    verdict: str
    reasons: list[str]
    params_ratio: float | None = None
    flops_ratio: float | None = None
    difference: Difference | None = None
    sentence: str = ""
    checks: dict[str, bool | None] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        """Flat JSON-able row (the table's columns)."""
        s, d = self.group.stats, self.difference
        return {
            "model": self.group.model,
            "task": self.group.task,
            "method": self.group.method,
            "budget": self.group.budget,
            "metric": self.group.metric,
            "seeds": list(s.seeds),
            "n": s.n,
            "mean": s.mean,
            "std": s.std,
            "params": self.group.params,
            "flops_per_step": self.group.flops,
            "baseline": None if self.baseline is None else self.baseline.label,
            "baseline_mean": None if self.baseline is None else self.baseline.stats.mean,
            "params_ratio": self.params_ratio,
            "flops_ratio": self.flops_ratio,
            "difference": None if d is None else d.mean,
            "p_value": None if d is None else d.p_value,
            "ci_low": None if d is None else d.ci_low,
            "ci_high": None if d is None else d.ci_high,
            "test": None if d is None else d.test,
            "checks": dict(self.checks),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "sentence": self.sentence,
        }


def group_runs(runs: list[Run], baseline: str = DEFAULT_BASELINE) -> list[Group]:
    """Groups sorted by model, task, the baseline first, then method and rank."""
    buckets: dict[tuple[str, str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        buckets[run.group_key].append(run)
    groups = [Group(*key, runs=sorted(rs, key=lambda r: r.seed)) for key, rs in buckets.items()]
    return sorted(
        groups,
        key=lambda g: (g.model, g.task, g.method != baseline, g.method, g.rank, g.budget),
    )


def find_baseline(
    group: Group, groups: list[Group], baseline: str = DEFAULT_BASELINE
) -> Group | None:
    """The baseline group of the same model and task: same rank if any, else the highest."""
    candidates = [
        g
        for g in groups
        if g.method == baseline and g.model == group.model and g.task == group.task
    ]
    if not candidates:
        return None
    same_rank = [g for g in candidates if g.rank == group.rank]
    return (same_rank or sorted(candidates, key=lambda g: (g.rank, len(g.runs))))[-1]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def judge(group: Group, baseline: Group | None, criteria: Criteria) -> Comparison:
    """The verdict of ``group`` against ``baseline`` under the spec's ``criteria``."""
    stats = group.stats
    if group.method == criteria.baseline:
        stable = None if stats.std is None else stats.std <= criteria.max_std_points
        reasons = [f"the LoRA baseline ({stats.n} seed(s))"]
        if stable is False:
            reasons.append(f"its std {stats.std:.2f} exceeds {criteria.max_std_points}")
        return Comparison(group, None, BASELINE, reasons, checks={"stability": stable})
    if baseline is None:
        return Comparison(
            group,
            None,
            NOT_ENOUGH_DATA,
            [f"no LoRA baseline for {group.model}/{group.task}"],
            sentence=f"{group.label} has no LoRA run on {group.task} to compare with.",
        )
    base_stats = baseline.stats
    params_ratio = _ratio(group.params, baseline.params)
    flops_ratio = _ratio(group.flops, baseline.flops)
    diff = compare_scores(group.scores, baseline.scores)
    comparison = Comparison(
        group,
        baseline,
        NOT_ENOUGH_DATA,
        [],
        params_ratio=params_ratio,
        flops_ratio=flops_ratio,
        difference=diff,
        sentence=describe_difference(group.label, f"LoRA {baseline.budget}", group.task, diff),
    )
    short = [
        f"{label} has {s.n} seed(s), needs {criteria.min_seeds}"
        for label, s in ((group.label, stats), (f"baseline {baseline.label}", base_stats))
        if s.n < criteria.min_seeds
    ]
    if short:
        comparison.reasons = short
        return comparison
    efficient = (params_ratio is not None and params_ratio <= criteria.params_ratio) or (
        flops_ratio is not None and flops_ratio <= criteria.flops_ratio
    )
    guarded = guardrail(group, baseline, diff, criteria.guardrail_points)
    stable = stats.std is not None and stats.std <= criteria.max_std_points
    comparison.checks = {"efficiency": efficient, "guardrail": guarded, "stability": stable}
    pr = "n/a" if params_ratio is None else f"{params_ratio:.2f}"
    fr = "n/a" if flops_ratio is None else f"{flops_ratio:.2f}"
    reasons = [
        f"efficiency {'ok' if efficient else 'FAILS'}: params x{pr} "
        f"(<= {criteria.params_ratio}) or FLOPs x{fr} (<= {criteria.flops_ratio})",
        f"guardrail {_word(guarded)}: {stats.mean:.2f} vs LoRA {base_stats.mean:.2f}, "
        f"difference {_interval(diff)} vs -{criteria.guardrail_points}",
        f"stability {'ok' if stable else 'FAILS'}: std {stats.std:.2f} "
        f"(<= {criteria.max_std_points})",
    ]
    comparison.reasons = reasons
    if not efficient or guarded is False or not stable:
        comparison.verdict = FAIL
    else:
        comparison.verdict = PASS if guarded else INCONCLUSIVE
    return comparison


def guardrail(group: Group, baseline: Group, diff: Difference, margin: float) -> bool | None:
    """The accuracy guardrail with power: ``True`` only when the 95% interval of the
    paired difference lies above ``-margin`` and is no wider than ``margin`` (an interval
    wider than the margin is not a measurement that can decide it); ``False`` when it lies
    below ``-margin``; ``None`` (inconclusive) otherwise, when it cannot be computed, or
    when every run of both groups scores 0 (a score that cannot tell the arms apart)."""
    scores = [*group.scores.values(), *baseline.scores.values()]
    if all(s == 0 for s in scores) or diff.ci_low is None or diff.ci_high is None:
        return None
    if diff.ci_high < -margin:
        return False
    if diff.ci_low > -margin and diff.ci_high - diff.ci_low <= margin:
        return True
    return None


def _word(check: bool | None) -> str:
    return "INCONCLUSIVE" if check is None else "ok" if check else "FAILS"


def _interval(diff: Difference) -> str:
    if diff.ci_low is None or diff.ci_high is None:
        return f"{diff.mean:+.2f} (no interval)"
    return f"{diff.mean:+.2f} [{diff.ci_low:+.2f}, {diff.ci_high:+.2f}]"


def compare_runs(runs: list[Run], criteria: Criteria | None = None) -> list[Comparison]:
    """Group ``runs`` and judge every group against its LoRA baseline."""
    criteria = criteria or Criteria()
    groups = group_runs(runs, criteria.baseline)
    return [judge(g, find_baseline(g, groups, criteria.baseline), criteria) for g in groups]


def fmt(value: float | None, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def human(value: float | None) -> str:
    """``7168`` -> ``7.17K``; ``3.3e9`` -> ``3.30G``."""
    if value is None:
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


TABLE_COLUMNS = (
    "task", "method", "budget", "metric", "seeds", "score", "params", "FLOPs/step",
    "params x", "FLOPs x", "diff", "p", "verdict",
)  # fmt: skip


def table_rows(comparisons: list[Comparison]) -> list[list[str]]:
    """The comparison table as strings, columns :data:`TABLE_COLUMNS`."""
    rows = []
    for c in comparisons:
        s, d = c.group.stats, c.difference
        score = fmt(s.mean) + ("" if s.std is None else f" ± {s.std:.2f}")
        rows.append(
            [
                c.group.task,
                c.group.method,
                c.group.budget,
                c.group.metric,
                ",".join(str(x) for x in s.seeds),
                score,
                human(c.group.params),
                human(c.group.flops),
                fmt(c.params_ratio),
                fmt(c.flops_ratio),
                "—" if d is None else fmt(d.mean, "+.2f"),
                "—" if d is None else fmt(d.p_value, ".3g"),
                c.verdict,
            ]
        )
    return rows


def markdown_table(comparisons: list[Comparison]) -> str:
    head = "| " + " | ".join(TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(row) + " |" for row in table_rows(comparisons)]
    return "\n".join([head, sep, *body])
