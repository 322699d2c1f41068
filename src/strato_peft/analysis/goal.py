"""The stricter goal of a searched method against its cost-matched controls.

The product spec's verdicts (:mod:`.compare`) ask whether a method is cheaper than LoRA
at LoRA's score. The stricter goal asks whether the *search* earned its cost: with
``M`` the method (``strato``) and its controls the groups of the same model and task
whose run label is ``M-<control>`` (``strato-band``, ``strato-random`` ...):

* cost: params <= ``params_ratio`` x LoRA's **and** FLOPs per step <= ``flops_ratio`` x;
* search cost: optimizer-step equivalents of the search (``search.json``) <=
  ``search_cost_ratio`` x one LoRA training of the run;
* accuracy: the spec's guardrail on the chosen score (the paired interval lies above
  ``-guardrail_points`` and is no wider than that);
* loss no worse than LoRA: the 95% interval of the paired held-out loss difference
  ``M - LoRA`` includes 0 or lies below it;
* better than each of ``better_than``: the interval of ``M - control`` in loss lies
  below 0 (MET), above it (NOT MET), or straddles it (INCONCLUSIVE);
* at least as good as each of ``at_least``: the loss interval includes 0 or lies below.

Loss is the criterion between arms because it is the finest measurement the report split
gives (answer-token accuracy moves in steps of one token). Differences are paired over
the seeds both arms ran (Student-t interval, :func:`.stats.compare_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from strato_peft.analysis.compare import (
    DEFAULT_BASELINE,
    INCONCLUSIVE,
    NOT_ENOUGH_DATA,
    Group,
    _ratio,
    find_baseline,
    group_runs,
    guardrail,
)
from strato_peft.analysis.runs import Run
from strato_peft.analysis.stats import Difference, compare_scores

MET = "MET"
NOT_MET = "NOT MET"


@dataclass(frozen=True)
class Goal:
    """What the searched ``method`` must show (module docstring)."""

    method: str = "strato"
    params_ratio: float = 0.5
    flops_ratio: float = 0.8
    search_cost_ratio: float = 2.0
    guardrail_points: float = 0.5
    better_than: tuple[str, ...] = ("random", "random-search")
    at_least: tuple[str, ...] = ("band",)
    baseline: str = DEFAULT_BASELINE


@dataclass(frozen=True)
class GoalCheck:
    """One line of the goal: what, the verdict and the numbers behind it."""

    group: str
    check: str
    verdict: str
    detail: str

    def as_row(self) -> dict[str, str]:
        return {"group": self.group, "check": self.check, "verdict": self.verdict,
                "detail": self.detail}  # fmt: skip


def _losses(group: Group) -> dict[int, float]:
    return {r.seed: r.eval_loss for r in group.runs if r.eval_loss is not None}


def _interval(d: Difference) -> str:
    if d.ci_low is None or d.ci_high is None:
        return f"{d.mean:+.4f} (no interval, {d.n} seed(s))"
    return f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}] over {d.n} seeds"


def loss_verdict(d: Difference, strictly_better: bool) -> str:
    """``strictly_better``: the interval of the loss difference lies below 0; otherwise
    "no worse": it includes 0 or lies below. Fewer than two paired seeds: not enough."""
    if d.test != "paired t-test" or d.ci_low is None or d.ci_high is None:
        return NOT_ENOUGH_DATA
    if strictly_better:
        return MET if d.ci_high < 0 else NOT_MET if d.ci_low > 0 else INCONCLUSIVE
    return MET if d.ci_low <= 0 else NOT_MET


def _search_cost(group: Group) -> float | None:
    values = [
        float(r.search_cost["step_equivalents_ratio"])
        for r in group.runs
        if isinstance(r.search_cost.get("step_equivalents_ratio"), (int, float))
    ]
    return sum(values) / len(values) if values else None


def judge_goal(runs: Sequence[Run], goal: Goal | None = None) -> list[GoalCheck]:
    """Every check of the goal for each group of ``goal.method`` (module docstring)."""
    goal = goal or Goal()
    groups = group_runs(list(runs), goal.baseline)
    checks: list[GoalCheck] = []
    for group in (g for g in groups if g.method == goal.method):
        label = f"{group.task} {group.label}"

        def add(check: str, verdict: str, detail: str, label: str = label) -> None:
            checks.append(GoalCheck(label, check, verdict, detail))

        baseline = find_baseline(group, groups, goal.baseline)
        if baseline is None:
            add("baseline", NOT_ENOUGH_DATA, f"no {goal.baseline} run on {group.task}")
            continue
        params = _ratio(group.params, baseline.params)
        flops = _ratio(group.flops, baseline.flops)
        if params is None or flops is None:
            add("cost", NOT_ENOUGH_DATA, "params or FLOPs per step missing")
        else:
            ok = params <= goal.params_ratio and flops <= goal.flops_ratio
            add("cost", MET if ok else NOT_MET,
                f"params {params:.3f}x (<= {goal.params_ratio}) and FLOPs {flops:.3f}x "
                f"(<= {goal.flops_ratio})")  # fmt: skip
        cost = _search_cost(group)
        if cost is None:
            add("search cost", NOT_ENOUGH_DATA, "no search cost in search.json")
        else:
            add("search cost", MET if cost <= goal.search_cost_ratio else NOT_MET,
                f"{cost:.2f}x one {goal.baseline} training in optimizer-step equivalents "
                f"(<= {goal.search_cost_ratio})")  # fmt: skip
        diff = compare_scores(group.scores, baseline.scores)
        guarded = guardrail(group, baseline, diff, goal.guardrail_points)
        shown = "no interval" if diff.ci_low is None or diff.ci_high is None else (
            f"{diff.mean:+.2f} [{diff.ci_low:+.2f}, {diff.ci_high:+.2f}]")  # fmt: skip
        add(f"{group.metric} >= {goal.baseline} - {goal.guardrail_points} points",
            INCONCLUSIVE if guarded is None else MET if guarded else NOT_MET,
            f"paired difference {shown} points")  # fmt: skip
        loss = compare_scores(_losses(group), _losses(baseline))
        add(f"loss no worse than {goal.baseline}", loss_verdict(loss, strictly_better=False),
            f"loss difference {_interval(loss)}")  # fmt: skip
        for names, strictly in ((goal.better_than, True), (goal.at_least, False)):
            for control in names:
                text = f"{'better than' if strictly else 'at least as good as'} {control}"
                other = next(
                    (g for g in groups if g.method == f"{goal.method}-{control}"
                     and g.model == group.model and g.task == group.task),
                    None,
                )  # fmt: skip
                if other is None:
                    add(text, NOT_ENOUGH_DATA, f"no {goal.method}-{control} runs")
                    continue
                d = compare_scores(_losses(group), _losses(other))
                add(text, loss_verdict(d, strictly_better=strictly),
                    f"loss difference {_interval(d)}")  # fmt: skip
    return checks
