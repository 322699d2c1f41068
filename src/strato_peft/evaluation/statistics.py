"""Uncertainty of evaluation metrics: standard errors, bootstrap intervals, pass@k.

Test sets are small (GSM8K has 1319 items, about 1.3 points of standard error at
30 % accuracy), so every mean is reported with its standard error and a 95 %
interval. Pure Python: no numpy needed to score a predictions file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean, ``s / sqrt(n)`` with the n-1 sample std.

    The same estimator as lm-evaluation-harness' ``mean_stderr``; 0 for n < 2.
    """
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def bootstrap_ci(
    values: Sequence[float], *, iterations: int = 1000, alpha: float = 0.05, seed: int = 1234
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so reports are reproducible)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(iterations))
    low = means[math.floor(alpha / 2 * (iterations - 1))]
    high = means[math.ceil((1 - alpha / 2) * (iterations - 1))]
    return low, high


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927): it stays honest at 0 and n,
    where a normal or bootstrap interval collapses to a point (0 of 32: [0, 0.107])."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(name: str, values: Sequence[float]) -> dict[str, Any]:
    """``{name: mean, name_stderr: se, name_ci95: [lo, hi]}``.

    The interval is Wilson's for a proportion (every value 0 or 1), else the normal
    interval clipped to [0, 1].
    """
    mean, se = mean_stderr(values)
    if values and all(v in (0, 1) for v in values):
        interval = list(wilson_interval(sum(values), len(values)))
    else:
        interval = [max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)]
    return {name: mean, f"{name}_stderr": se, f"{name}_ci95": interval}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` correct (Chen et al., 2021).

    ``pass@k = 1 - C(n - c, k) / C(n, k)``, computed as a stable product
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
