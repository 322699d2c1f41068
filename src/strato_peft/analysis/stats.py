"""Statistics over seeds: group summaries, paired t-test and the interval of a difference.

A method and its LoRA baseline are compared on the seeds both ran (the spec fixes
seeds {42, 43, 44}), so the test is paired (``scipy.stats.ttest_rel``): seed-to-seed
variation shared by both methods (data order, initialisation) cancels. Without at
least two shared seeds it falls back to Welch's unpaired test. The interval of a
paired difference is Student's t interval of the mean difference (a bootstrap of three
differences would collapse to their range); an unpaired one is a bootstrap of the
groups, ``n_resamples`` times with a fixed generator. With three seeds intervals are
wide, and verdicts say INCONCLUSIVE rather than claim more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from strato_peft.analysis.runs import Run


@dataclass(frozen=True)
class GroupStats:
    """Mean and sample standard deviation (ddof=1) of a group's scores over seeds."""

    n: int
    mean: float
    std: float | None
    """``None`` with a single seed: the spread is unknown, not zero."""
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Difference:
    """``method - baseline`` in points, with a test and a 95% interval."""

    mean: float
    test: str
    """``paired t-test`` (shared seeds), ``Welch t-test`` or ``none``."""
    n: int
    """Pairs for the paired test; otherwise the smaller group's size."""
    t_statistic: float | None
    p_value: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float = 0.95


def group_stats(runs: list[Run]) -> GroupStats:
    scores = np.array([r.score for r in runs], dtype=float)
    std = float(np.std(scores, ddof=1)) if len(scores) >= 2 else None
    return GroupStats(
        n=len(scores),
        mean=float(np.mean(scores)) if len(scores) else math.nan,
        std=std,
        seeds=tuple(sorted(r.seed for r in runs)),
    )


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def compare_scores(
    method: dict[int, float],
    baseline: dict[int, float],
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """Difference of ``method`` and ``baseline`` scores (seed -> points).

    Paired t-test and its Student-t interval over shared seeds when there are at least two,
    else Welch's t-test and an independent bootstrap. A zero-variance difference has no
    t statistic (``None``), and its interval collapses to the difference itself.
    """
    from scipy import stats

    rng = np.random.default_rng(seed)
    alpha = (1.0 - confidence) / 2.0
    shared = sorted(set(method) & set(baseline))
    if len(shared) >= 2:
        a = np.array([method[s] for s in shared])
        b = np.array([baseline[s] for s in shared])
        diff = a - b
        if np.ptp(diff) == 0:
            t_stat, p_value = None, None
        else:
            res = stats.ttest_rel(a, b)
            t_stat, p_value = _finite(res.statistic), _finite(res.pvalue)
        # Student-t interval of the mean paired difference: with 3 seeds a bootstrap of
        # the 3 differences collapses to their range and claims far too much confidence.
        half = float(stats.t.ppf(1 - alpha, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)))
        return Difference(
            mean=float(diff.mean()),
            test="paired t-test",
            n=len(shared),
            t_statistic=t_stat,
            p_value=p_value,
            ci_low=float(diff.mean()) - half,
            ci_high=float(diff.mean()) + half,
            confidence=confidence,
        )
    a = np.array(list(method.values()), dtype=float)
    b = np.array(list(baseline.values()), dtype=float)
    if len(a) == 0 or len(b) == 0:
        return Difference(math.nan, "none", 0, None, None, None, None, confidence)
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Difference(mean, "none", min(len(a), len(b)), None, None, None, None, confidence)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        t_stat, p_value = None, None
    else:
        res = stats.ttest_ind(a, b, equal_var=False)
        t_stat, p_value = _finite(res.statistic), _finite(res.pvalue)
    boot = a[rng.integers(0, len(a), size=(n_resamples, len(a)))].mean(axis=1) - b[
        rng.integers(0, len(b), size=(n_resamples, len(b)))
    ].mean(axis=1)
    return Difference(
        mean=mean,
        test="Welch t-test",
        n=min(len(a), len(b)),
        t_statistic=t_stat,
        p_value=p_value,
        ci_low=float(np.quantile(boot, alpha)),
        ci_high=float(np.quantile(boot, 1 - alpha)),
        confidence=confidence,
    )


def describe_difference(
    method_label: str, baseline_label: str, task: str, diff: Difference, alpha: float = 0.05
) -> str:
    """One plain-language sentence about ``diff``."""
    if math.isnan(diff.mean):
        return f"{method_label} cannot be compared with {baseline_label} on {task}: no scores."
    direction = "higher" if diff.mean > 0 else "lower" if diff.mean < 0 else "no different"
    size = f"{abs(diff.mean):.2f} points {direction} than" if diff.mean else "the same as"
    text = f"{method_label} scores {size} {baseline_label} on {task}"
    if diff.ci_low is not None and diff.ci_high is not None:
        text += f" ({100 * diff.confidence:.0f}% CI {diff.ci_low:+.2f} to {diff.ci_high:+.2f}"
        if diff.p_value is not None:
            text += f"; {diff.test} over {diff.n} seeds, p = {diff.p_value:.3g})"
        else:
            text += f"; identical difference on all {diff.n} seeds, no test needed)"
    else:
        text += f" (only {diff.n} seed(s): no test possible)"
    if diff.p_value is None:
        return text + "."
    if diff.p_value < alpha:
        return text + f": the difference is significant at {alpha:g}."
    return text + f": the difference is not significant at {alpha:g}."
