"""Figures (matplotlib, Agg backend): score vs cost, training curves, per-module rank heatmaps.

Each function returns a ``Figure``; :func:`save_all` writes PNGs and :func:`png_bytes`
feeds the HTML report. Error bars are the standard deviation over seeds (none for a
single seed).
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import EngFormatter, MaxNLocator, NullFormatter

from strato_peft.analysis.compare import Group, group_runs
from strato_peft.analysis.runs import Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_MODULE = re.compile(r"layers\.(\d+)\.(?:\w+\.)?(\w+_proj)")


def score_label(metric: str) -> str:
    return "-100 x held-out loss" if metric == "eval_loss" else f"{metric} (points)"


def _by_task(groups: list[Group]) -> dict[tuple[str, str], list[Group]]:
    tasks: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in groups:
        tasks[(g.model, g.task)].append(g)
    return dict(tasks)


def score_vs_cost(runs: list[Run], cost: str = "params") -> Figure:
    """Mean score (± std over seeds) against trainable params or FLOPs per step, per task."""
    tasks = _by_task(group_runs(runs))
    fig, axes = plt.subplots(
        1, max(1, len(tasks)), figsize=(6 * max(1, len(tasks)), 4.5), squeeze=False
    )
    for ax, ((model, task), groups) in zip(axes[0], tasks.items(), strict=False):
        for method in sorted({g.method for g in groups}):
            points = []
            for g in groups:
                x = g.params if cost == "params" else g.flops
                if g.method == method and x is not None:
                    s = g.stats
                    points.append((x, s.mean, s.std or 0.0, g.budget))
            points.sort()
            if not points:
                continue
            xs, ys, errs, labels = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4, label=method)
            for x, y, label in zip(xs, ys, labels, strict=True):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        xs_all = [p for line in ax.get_lines() for p in line.get_xdata()]
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 10:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel(
            "trainable parameters" if cost == "params" else "train FLOPs / optimizer step"
        )
        ax.set_ylabel(score_label(groups[0].metric))
        ax.set_title(f"{model} / {task}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def training_curves(runs: list[Run]) -> Figure:
    """Training loss per optimizer step (one line per run; held-out loss as markers)."""
    tasks = _by_task(group_runs(runs))
    fig, axes = plt.subplots(
        1, max(1, len(tasks)), figsize=(6 * max(1, len(tasks)), 4.5), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ((model, task), groups) in zip(axes[0], tasks.items(), strict=False):
        for i, g in enumerate(groups):
            color = colors[i % len(colors)]
            for j, run in enumerate(g.runs):
                steps = [h["step"] for h in run.history if "loss" in h]
                losses = [h["loss"] for h in run.history if "loss" in h]
                ax.plot(steps, losses, color=color, alpha=0.8, label=g.label if j == 0 else None)
                evals = [(h["step"], h["eval_loss"]) for h in run.history if "eval_loss" in h]
                if evals:
                    ax.plot(*zip(*evals, strict=True), "x", color=color)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (x: held-out)")
        ax.set_title(f"{model} / {task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rank_matrix(rank_pattern: dict[str, int]) -> tuple[list[int], list[str], list[list[float]]]:
    """Layers, module types and ranks (NaN where a module has no adapter) of a rank pattern."""
    cells: dict[tuple[int, str], int] = {}
    for name, rank in rank_pattern.items():
        match = _LAYER_MODULE.search(name)
        if match:
            cells[(int(match.group(1)), match.group(2))] = rank
    layers = sorted({layer for layer, _ in cells})
    modules = [m for m in MODULE_ORDER if any(k[1] == m for k in cells)]
    matrix = [[float(cells.get((layer, m), float("nan"))) for m in modules] for layer in layers]
    return layers, modules, matrix


def rank_heatmap(run: Run) -> Figure | None:
    """Rank per (layer, module type) of a run whose adapter has per-module ranks."""
    if not run.rank_pattern:
        return None
    layers, modules, matrix = rank_matrix(run.rank_pattern)
    if not layers:
        return None
    return _rank_matrix_figure(
        layers, modules, matrix, f"ranks: {run.method} {run.budget} seed {run.seed}"
    )


def _rank_matrix_figure(
    layers: list[int], modules: list[str], matrix: list[list[float]], title: str
) -> Figure:
    """Heatmap of ranks, layers down and module types across, values written in."""
    fig, ax = plt.subplots(figsize=(1.2 * len(modules) + 2.5, 0.3 * len(layers) + 1.8))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    if len(layers) <= 40:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    return fig


def all_figures(runs: list[Run]) -> dict[str, Figure]:
    """Every figure of the analysis by file stem."""
    figures: dict[str, Figure] = {}
    if runs:
        figures["score_vs_params"] = score_vs_cost(runs, "params")
        if any(r.flops_per_step is not None for r in runs):
            figures["score_vs_flops"] = score_vs_cost(runs, "flops")
        figures["training_curves"] = training_curves(runs)
    for run in runs:
        heatmap = rank_heatmap(run)
        if heatmap is not None:
            stem = f"ranks_{run.model}_{run.task}_{run.method}_{run.budget}_seed{run.seed}"
            figures[re.sub(r"[^\w.-]", "_", stem)] = heatmap
    return figures


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_all(figures: dict[str, Figure], out_dir: Path, dpi: int = 100) -> list[Path]:
    """Write each figure as ``<out_dir>/<stem>.png``; closes them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures.items():
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths


# -- dynamic rank schedule (rank_history.json: step -> module -> rank) ----------------------
def load_rank_history(path: Path) -> dict[int, dict[str, int]]:
    """``rank_history.json`` of a run folder (or the file itself), steps as ints."""
    from strato_peft.results import RANK_HISTORY_FILE, read_json_object

    path = path / RANK_HISTORY_FILE if path.is_dir() else path
    return {int(step): ranks for step, ranks in read_json_object(path).items()}


def rank_over_steps(
    history: dict[int, dict[str, int]], total_steps: int | None = None, top: int = 12
) -> Figure:
    """Rank of each module over optimizer steps (a step function: a rank holds until the
    next reallocation). The ``top`` modules that changed most are labelled; the rest are
    thin grey lines, and the mean rank is dashed."""
    steps = sorted(history)
    end = max(total_steps or steps[-1], steps[-1])
    xs = [*steps, end]
    modules = sorted(history[steps[0]])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))

    def series(name: str) -> list[int]:
        values = [history[s].get(name, 0) for s in steps]
        return [*values, values[-1]]

    spread = {m: max(series(m)) - min(series(m)) for m in modules}
    labelled = sorted((m for m in modules if spread[m]), key=lambda m: (-spread[m], m))[:top]
    for name in modules:
        if name not in labelled:
            ax.step(xs, series(name), where="post", color="0.75", linewidth=0.7)
    for name in labelled:
        match = _LAYER_MODULE.search(name)
        label = f"L{match.group(1)} {match.group(2)}" if match else name
        ax.step(xs, series(name), where="post", linewidth=1.4, label=label)
    mean = [sum(history[s].values()) / max(len(history[s]), 1) for s in steps]
    ax.step(xs, [*mean, mean[-1]], where="post", color="k", linestyle="--", label="mean rank")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rank")
    ax.set_title("rank over steps")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    return fig


def rank_history_heatmap(history: dict[int, dict[str, int]], step: int | None = None) -> Figure:
    """Rank per (layer, module type) at ``step`` (default: the last recorded step)."""
    at = max(history) if step is None else max(s for s in history if s <= step)
    layers, modules, matrix = rank_matrix(history[at])
    return _rank_matrix_figure(layers, modules, matrix, f"ranks at step {at}")
