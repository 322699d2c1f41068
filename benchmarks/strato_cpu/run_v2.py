"""STRATO v2 CPU evidence: SmolLM2-135M, real GSM8K, seeds 42/43/44, six cost-matched arms.

Every run is its own ``main.py`` process with
``configs/experiments/cpu_smollm2_gsm8k_strato_v2.yaml`` plus overrides, strictly one
after another. First the learning-rate sweep of the LoRA reference (seed 42, chosen on
the search-validation split, never the report split), then for every seed, in order:

1. ``lora``: the reference, LoRA r16 on q_proj and v_proj;
2. ``strato``: the structured search (successive halving), then its winner's training;
3. ``random-search``: the same search with random proposals (the controller's ablation);
4. ``uniform``: LoRA on q,v, all layers, at STRATO's params;
5. ``band``: every module type from STRATO's lowest layer up at one rank, matched on
   STRATO's params and FLOPs (the hand rule, the control to beat);
6. ``random``: a random allocation of the same space within 5% of STRATO's params and
   FLOPs.

A complete run folder is not repeated, so the script resumes where it stopped. After
every run ``benchmarks/strato_cpu/results_v2.json`` is rewritten (the protocol, one row
per run, the verdicts of ``strato-peft compare`` on the report split's answer-token
accuracy and the stricter goal's checks of ``strato-peft compare --goal strato``);
``table_v2.py`` turns it into the README's table.

    STRATO_DATA_DIR=../shared/data python benchmarks/strato_cpu/run_v2.py
    python benchmarks/strato_cpu/run_v2.py --summarize-only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))

from strato_peft.results import (  # noqa: E402
    COMPLETE,
    COSTS_FILE,
    METRICS_FILE,
    SEARCH_FILE,
    atomic_write_json,
    read_json_or,
    read_status,
)

CONFIG = ROOT / "configs" / "experiments" / "cpu_smollm2_gsm8k_strato_v2.yaml"
ARMS = ("lora", "strato", "random-search", "uniform", "band", "random")
LABELS = {
    "lora": "lora_rank16",
    "strato": "strato_rank16_lambda0.1",
    "random-search": "strato-random-search_rank16",
    "uniform": "strato-uniform_rank16",
    "band": "strato-band_rank16",
    "random": "strato-random_rank16",
}
SEEDS = (42, 43, 44)
SWEEP = (1.0e-3, 2.5e-3, 5.0e-3)
OUTPUT = HERE / "results_v2.json"


def folder(out: Path, lr: float, arm: str, seed: int) -> Path:
    return out / f"lr{lr:g}" / "smollm2_135m" / "gsm8k" / f"{LABELS[arm]}_seed{seed}"


def overrides(out: Path, lr: float, arm: str, seed: int) -> list[str]:
    base = [f"output.dir={out / f'lr{lr:g}'}", f"training.learning_rate={lr}"]
    if arm == "lora":
        return [*base, "peft.method=lora"]
    if arm == "strato":
        return base
    if arm == "random-search":
        return [*base, "peft.strato.control=random-search"]
    found = folder(out, lr, "strato", seed)
    return [*base, f"peft.strato.control={arm}", f"peft.strato.control_from={found}"]


def run_one(out: Path, lr: float, arm: str, seed: int, log: Path) -> float:
    target = folder(out, lr, arm, seed)
    if read_status(target).get("status") == COMPLETE:
        return 0.0
    command = [sys.executable, str(ROOT / "main.py"), "--config", str(CONFIG), "--seed", str(seed)]
    for item in overrides(out, lr, arm, seed):
        command += ["--override", item]
    print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed} lr {lr:g}", flush=True)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as handle:
        done = subprocess.run(
            command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def row(out: Path, lr: float, arm: str, seed: int) -> dict[str, Any] | None:
    return row_at(out, folder(out, lr, arm, seed), arm, seed, folder(out, lr, "lora", seed))


def row_at(
    out: Path, target: Path, arm: str, seed: int, lora_folder: Path
) -> dict[str, Any] | None:
    """The row of one complete run folder (None while it is not complete); costs of the
    search are ratios to ``lora_folder``'s training."""
    if read_status(target).get("status") != COMPLETE:
        return None
    metrics = read_json_or(target / METRICS_FILE, {})
    costs = read_json_or(target / COSTS_FILE, {})
    final = metrics.get("final", {})
    steps_run = max(1, len([h for h in metrics.get("history", []) if not h.get("search")]))
    entry: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "folder": str(target.relative_to(out)),
        "report_loss": final.get("eval_loss"),
        "report_loss_ci95": final.get("eval_loss_ci95"),
        "report_token_accuracy": final.get("token_accuracy"),
        "report_token_accuracy_ci95": final.get("token_accuracy_ci95"),
        "search_loss": final.get("search_loss"),
        "params": costs.get("trainable_params"),
        "flops_per_step": costs.get("train_flops_per_step"),
        "step_s": (costs.get("train_time_s") or 0.0) / steps_run,
        "peak_memory_bytes": costs.get("peak_memory_bytes"),
        "allocation": metrics.get("method", {}).get("allocation"),
        "control": metrics.get("method", {}).get("control"),
    }
    search = read_json_or(target / SEARCH_FILE, {})
    if search.get("mode") == "structured":
        lora = read_json_or(lora_folder / COSTS_FILE, {})
        cost = search["cost"]
        entry["search_cost_ratio"] = cost["step_equivalents_ratio"]
        entry["search_net_cost_ratio"] = cost["net_step_equivalents_ratio"]
        if lora.get("train_time_s"):
            entry["search_wall_ratio"] = cost["search_wall_time_s"] / lora["train_time_s"]
        entry["evaluations_per_rung"] = search["evaluations_per_rung"]
        entry["proxy_spearman"] = search["proxy_spearman"]
        entry["surrogate_fit_spearman"] = search["surrogate_fit_spearman"]
        entry["probe_stability_spearman"] = search["sensitivity_probe_stability_spearman"]
        entry["winner"] = search["winner"]
        entry["splits"] = search["splits"]
    return entry


def load_runs(out: Path, lr: float) -> list[Any]:
    from strato_peft.analysis.runs import ACCURACY_METRIC, discover_runs

    root = out / f"lr{lr:g}"
    if not root.is_dir():
        return []
    return discover_runs(root, metric=ACCURACY_METRIC, cost_model=False)[0]


def goal(out: Path, lr: float) -> list[dict[str, str]]:
    """The stricter goal's checks, as ``strato-peft compare --goal strato`` judges them."""
    from strato_peft.analysis.goal import judge_goal

    return [c.as_row() for c in judge_goal(load_runs(out, lr))]


def verdicts(out: Path, lr: float) -> list[dict[str, Any]]:
    from strato_peft.analysis.compare import compare_runs

    runs = load_runs(out, lr)
    rows = []
    for c in compare_runs(runs):
        d = c.difference
        rows.append(
            {
                "group": c.group.label, "verdict": c.verdict, "reasons": c.reasons,
                "checks": c.checks, "params_ratio": c.params_ratio, "flops_ratio": c.flops_ratio,
                "difference": None if d is None else {"mean": d.mean, "ci95": [d.ci_low, d.ci_high], "n": d.n},
            }
        )  # fmt: skip
    return rows


def chosen_lr(out: Path) -> float | None:
    """The sweep's learning rate with the lowest search-validation loss (all three done)."""
    losses = {}
    for lr in SWEEP:
        entry = row(out, lr, "lora", 42)
        if entry is None or entry["search_loss"] is None:
            return None
        losses[lr] = entry["search_loss"]
    return min(losses, key=losses.__getitem__)


def summarize(out: Path, started: float) -> None:
    best = chosen_lr(out)
    sweep = [
        {"learning_rate": lr, **{k: v for k, v in (row(out, lr, "lora", 42) or {}).items() if k in ("search_loss", "report_loss", "report_token_accuracy")}}
        for lr in SWEEP
    ]  # fmt: skip
    rows = [r for seed in SEEDS for arm in ARMS if best and (r := row(out, best, arm, seed))]
    report = {
        "protocol": {
            "config": str(CONFIG.relative_to(ROOT)),
            "model": "SmolLM2-135M-Instruct (packaged, fp32)",
            "data": "GSM8K train.jsonl (training, search-validation split of 64 held out of it), "
            "report split: 256 problems of the 5% hold-out of train.jsonl",
            "steps": 32, "batch": "4 x 128 tokens", "seeds": list(SEEDS),
            "budget": {"params": 0.5, "flops": 0.8}, "alpha_policy": "fixed",
            "lr_sweep": sweep, "learning_rate": best,
            "lr_sweep_note": "LoRA at 3 learning rates on seed 42, chosen on the search split; "
            "every arm then trains at it (the per-arm grid was cut for time)",
        },
        "runs": rows,
        "verdicts": verdicts(out, best) if best else [],
        "goal": goal(out, best) if best else [],
        "wall_s_this_session": round(time.perf_counter() - started),
    }  # fmt: skip
    atomic_write_json(OUTPUT, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "strato_cpu_v2")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args()
    if not os.environ.get("STRATO_DATA_DIR") and not args.summarize_only:
        parser.error("set STRATO_DATA_DIR (the folder with gsm8k/)")
    started = time.perf_counter()
    log = args.out / "runs.log"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        for lr in (2.5e-3, 1.0e-3, 5.0e-3):
            run_one(args.out, lr, "lora", 42, log)
            summarize(args.out, started)
        best = chosen_lr(args.out)
        assert best is not None
        print(f"learning rate: {best:g} (the sweep's lowest search-split loss)", flush=True)
        for seed in args.seeds:
            for arm in ARMS:
                run_one(args.out, best, arm, seed, log)
                summarize(args.out, started)
    summarize(args.out, started)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
