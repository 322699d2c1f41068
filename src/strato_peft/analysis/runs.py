"""Loading run folders: one :class:`Run` per complete folder, a reason for every other.

A run folder (``<output.dir>/<model>/<task>/<method>_rank<r>[_lambda<l>]_seed<s>/``, see
``strato_peft.results``) counts only when ``status.json`` says ``complete`` and its
``config.yaml``, ``metrics.json`` and ``costs.json`` parse and hold the chosen score.
Anything else is returned as a :class:`Skipped` with the reason, never raised: a
half-written or failed run must not crash the analysis nor enter an average.

Scores are in *points* (a [0, 1] metric times 100), the unit of the product spec's
"score >= baseline - 0.5" and "std <= 0.4" rules. The primary metric of each task is
:data:`PRIMARY_METRICS`; ``eval_loss`` (the held-out answer-token loss) is the
secondary score, as ``-100 x loss`` so that higher is better for every score.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from strato_peft.results import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    COMPLETE,
    CONFIG_FILE,
    COSTS_FILE,
    ENV_FILE,
    FAST_DEV_SUFFIX,
    METRICS_FILE,
    SEARCH_FILE,
    STATUS_FILE,
    RunFileError,
    read_json_object,
    read_json_or,
)

log = logging.getLogger(__name__)

PRIMARY_METRICS: dict[str, str] = {
    "gsm8k": "strict-match",
    "mmlu": "acc",
    "humaneval": "pass@1",
    "alpaca": "eval_loss",
}
"""Task -> primary metric. GSM8K's strict match (``#### N`` answer format, lm-eval's
headline filter); Alpaca has no reference answers, so its score is the held-out loss."""

COST_MODEL_FLOPS = "cost_model_train_flops_per_step"
"""The key of ``costs.json`` with the cost model's FLOPs per step of the trained adapter."""
LOSS_METRIC = "eval_loss"
ACCURACY_METRIC = "token_accuracy"
"""Teacher-forced answer-token accuracy on the report split, in points: a score the CPU
can measure where generation accuracy is 0 for every arm."""
PRIMARY = "primary"
RUN_NAME = re.compile(
    r"^(?P<method>[a-z0-9_-]+?)_rank(?P<rank>\d+)(?:_lambda(?P<lam>[^_]+))?_seed(?P<seed>\d+)$"
)
"""A run folder's name: the method's run label (``Method.run_label``) and the seed."""


@dataclass
class Run:
    """One complete run folder, with its score in points (higher is better)."""

    folder: Path
    model: str
    task: str
    method: str
    rank: int
    lambda_: float | None
    seed: int
    metric: str
    score: float
    eval_loss: float | None
    train_loss: float | None
    trainable_params: int
    total_params: int | None
    flops_per_step: float | None
    flops_source: str
    wall_time_s: float | None
    task_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any]
    env: dict[str, Any]
    rank_pattern: dict[str, int] | None = None
    costs: dict[str, Any] = field(default_factory=dict)
    search_cost: dict[str, Any] = field(default_factory=dict)
    """A searched method's ``search.json`` cost (step equivalents, wall seconds), else {}."""

    @property
    def budget(self) -> str:
        """``rank16`` or ``rank16_lambda0.1``: runs of one method differing only by seed share it."""
        text = f"rank{self.rank}"
        return text if self.lambda_ is None else f"{text}_lambda{self.lambda_:g}"

    @property
    def group_key(self) -> tuple[str, str, str, str]:
        return (self.model, self.task, self.method, self.budget)


@dataclass(frozen=True)
class Skipped:
    """A folder that does not count, and why."""

    folder: Path
    reason: str


def primary_metric(task: str) -> str:
    """The task's primary metric (:data:`PRIMARY_METRICS`); ``eval_loss`` for unknown tasks."""
    return PRIMARY_METRICS.get(task, LOSS_METRIC)


def score_points(
    metric: str,
    task_metrics: dict[str, Any],
    eval_loss: float | None,
    final: dict[str, Any] | None = None,
) -> float:
    """The score in points: ``100 x metric``, the report split's answer-token accuracy
    (already in points) or ``-100 x eval_loss``; ``KeyError`` when absent."""
    if metric == ACCURACY_METRIC:
        value = (final or {}).get(ACCURACY_METRIC)
        if not isinstance(value, (int, float)):
            raise KeyError(f"no final {ACCURACY_METRIC} in metrics.json (a run before v2?)")
        return float(value)
    if metric == LOSS_METRIC:
        if eval_loss is None:
            raise KeyError("no final eval_loss in metrics.json")
        return -100.0 * float(eval_loss)
    value = task_metrics.get(metric)
    if not isinstance(value, (int, float)):
        raise KeyError(f"no task metric {metric!r} in metrics.json (was task.final_eval off?)")
    return 100.0 * float(value)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ValueError(f"{CONFIG_FILE} is missing") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{CONFIG_FILE} is unreadable ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_FILE} is not a mapping")
    return data


def _rank_pattern(folder: Path) -> dict[str, int] | None:
    data = read_json_or(folder / ADAPTER_DIR / ADAPTER_CONFIG_FILE, None)
    pattern = data.get("rank_pattern") if isinstance(data, dict) else None
    if not isinstance(pattern, dict) or not pattern:
        return None
    ranks: dict[str, int] = {}
    for name, value in pattern.items():
        # AdaLoRA stores a boolean mask per module; LoRA/STRATO store the rank.
        ranks[name] = sum(bool(v) for v in value) if isinstance(value, list) else int(value)
    return ranks


def load_run(folder: Path, metric: str = PRIMARY, cost_model: bool = True) -> Run | Skipped:
    """Read one run folder; a :class:`Skipped` (with the reason) unless it is complete and sound."""
    folder = Path(folder)
    try:
        status = read_json_object(folder / STATUS_FILE).get("status")
    except RunFileError as exc:
        return Skipped(folder, f"{exc}: not a finished run")
    if status != COMPLETE:
        return Skipped(folder, f"status is {status!r}, not {COMPLETE!r}")
    try:
        config = _read_config(folder)
        metrics = read_json_object(folder / METRICS_FILE)
        costs = read_json_object(folder / COSTS_FILE)
        env = read_json_object(folder / ENV_FILE) if (folder / ENV_FILE).exists() else {}
        peft, task_cfg = config.get("peft") or {}, config.get("task") or {}
        task = str(task_cfg["name"])
        rank = int(peft["rank"])
        seed = int(config["seed"])
        model = str((config.get("model") or {})["name"])
        # The folder's name is the method's own run label (a STRATO control is
        # 'strato-uniform'); a renamed copy falls back to the config's method.
        label = RUN_NAME.match(folder.name)
        method = label["method"] if label else str(peft["method"])
        lam = label["lam"] if label else None
        final = metrics.get("final") or {}
        eval_loss = final.get("eval_loss")
        task_metrics = metrics.get("task") or {}
        chosen = primary_metric(task) if metric == PRIMARY else metric
        score = score_points(chosen, task_metrics, eval_loss, final)
        trainable = int(costs["trainable_params"])
    except KeyError as exc:
        reason = exc.args[0] if exc.args and " " in str(exc.args[0]) else f"missing field {exc}"
        return Skipped(folder, str(reason))
    except (ValueError, TypeError) as exc:
        return Skipped(folder, str(exc))
    if metrics.get("fast_dev_run") or folder.name.endswith(FAST_DEV_SUFFIX):
        return Skipped(folder, "a --fast-dev-run smoke test, not a result")
    if not math.isfinite(score):
        return Skipped(folder, f"its {chosen} is {score} (not a finite number)")
    flops, source = None, "unavailable"
    if cost_model and isinstance(costs.get(COST_MODEL_FLOPS), (int, float)):
        flops, source = float(costs[COST_MODEL_FLOPS]), "cost model"
    if flops is None and isinstance(costs.get("train_flops_per_step"), (int, float)):
        flops, source = float(costs["train_flops_per_step"]), "measured (FlopCounterMode)"
    return Run(
        folder=folder,
        model=model,
        task=task,
        method=method,
        rank=rank,
        lambda_=None if lam is None else float(lam),
        seed=seed,
        metric=chosen,
        score=score,
        eval_loss=None if eval_loss is None else float(eval_loss),
        train_loss=final.get("train_loss"),
        trainable_params=trainable,
        total_params=costs.get("total_params"),
        flops_per_step=flops,
        flops_source=source,
        wall_time_s=costs.get("wall_time_s"),
        task_metrics=task_metrics,
        history=[h for h in metrics.get("history") or [] if isinstance(h, dict)],
        config=config,
        env=env,
        rank_pattern=_rank_pattern(folder),
        costs=costs,
        search_cost=_search_cost(folder),
    )


def _search_cost(folder: Path) -> dict[str, Any]:
    search = read_json_or(folder / SEARCH_FILE, {})
    cost = search.get("cost") if isinstance(search, dict) and search.get("complete") else None
    return dict(cost) if isinstance(cost, dict) else {}


def _candidate_folders(results_dir: Path) -> list[Path]:
    found: set[Path] = set()
    for marker in (STATUS_FILE, CONFIG_FILE, METRICS_FILE):
        for path in results_dir.rglob(marker):
            if not {CHECKPOINTS_DIR, ADAPTER_DIR} & set(path.relative_to(results_dir).parts[:-1]):
                found.add(path.parent)
    for path in results_dir.rglob("*_seed*"):
        if path.is_dir() and RUN_NAME.match(path.name):
            found.add(path)
    return sorted(found)


def discover_runs(
    results_dir: str | Path, metric: str = PRIMARY, cost_model: bool = True
) -> tuple[list[Run], list[Skipped]]:
    """Every run folder under ``results_dir``: the complete runs and the skipped folders."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory {root} does not exist")
    runs: list[Run] = []
    skipped: list[Skipped] = []
    seen: dict[tuple[str, str, str, str, int], Path] = {}
    for folder in _candidate_folders(root):
        loaded = load_run(folder, metric, cost_model)
        if isinstance(loaded, Skipped):
            skipped.append(loaded)
            continue
        key = (*loaded.group_key, loaded.seed)
        if key in seen:
            skipped.append(Skipped(folder, f"duplicate of {seen[key]} (same group and seed)"))
            continue
        seen[key] = folder
        runs.append(loaded)
    return runs, skipped
