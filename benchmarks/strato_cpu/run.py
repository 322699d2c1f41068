"""STRATO vs uniform LoRA on a 2-core CPU: SmolLM2-135M, real GSM8K, seeds 42/43/44.

For every seed, in this order, each run its own process (so that peak memory is the
run's own) with ``configs/experiments/cpu_smollm2_gsm8k_strato.yaml``:

1. ``lora``: the reference, LoRA r16 on q_proj and v_proj (``peft.method=lora``);
2. ``strato``: search (wall-time cap: ``--search-cap`` x the LoRA run's wall time of
   the same seed), then the final training of the found allocation;
3. ``uniform``: LoRA on q,v at the rank whose params are closest to STRATO's allocation
   (``peft.strato.control=uniform``, ``control_from`` = the STRATO run folder);
4. ``random``: a random feasible allocation under the same hard budget
   (``peft.strato.control=random``).

Every run uses the same recipe (steps, batch, learning rate, data order); its metrics
come from its run folder. A finished run is not repeated, so the script resumes. The
summary (``results.json``) is rewritten after every run; the Markdown table is printed.

    STRATO_DATA_DIR=../shared/data python benchmarks/strato_cpu/run.py
    python benchmarks/strato_cpu/run.py --summarize-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFIG = ROOT / "configs" / "experiments" / "cpu_smollm2_gsm8k_strato.yaml"
METHODS = ("lora", "strato", "uniform", "random")
FOLDERS = {
    "lora": "lora_rank16_seed{seed}",
    "strato": "strato_rank16_lambda0.5_seed{seed}",
    "uniform": "strato-uniform_rank16_seed{seed}",
    "random": "strato-random_rank16_seed{seed}",
}


def run_folder(out: Path, method: str, seed: int) -> Path:
    return out / "smollm2_135m" / "gsm8k" / FOLDERS[method].format(seed=seed)


def read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_one(method: str, seed: int, args: argparse.Namespace) -> None:
    folder = run_folder(args.out, method, seed)
    status = read(folder / "status.json") or {}
    if status.get("status") == "complete":
        print(f"[{method} seed {seed}] complete already: {folder}", flush=True)
        return
    overrides = [
        f"output.dir={args.out}",
        f"logging.log_dir={args.out}/logs",
        f"task.data_path={args.data / 'gsm8k'}",
    ]
    if method == "lora":
        overrides.append("peft.method=lora")
    elif method == "strato":
        lora_costs = read(run_folder(args.out, "lora", seed) / "costs.json")
        if lora_costs is None:
            raise SystemExit(f"run lora seed {seed} first (its wall time caps the search)")
        cap = args.search_cap * float(lora_costs["wall_time_s"])
        overrides.append(f"peft.strato.search.max_wall_time_s={cap:.0f}")
    elif method == "uniform":
        source = run_folder(args.out, "strato", seed)
        if not (source / "allocation.json").exists():
            raise SystemExit(f"run strato seed {seed} first (uniform matches its params)")
        overrides += ["peft.strato.control=uniform", f"peft.strato.control_from={source}"]
    else:
        overrides.append("peft.strato.control=random")
    command = [sys.executable, str(ROOT / "main.py"), "--config", str(CONFIG), "--seed", str(seed)]
    command += [item for o in overrides for item in ("--override", o)]
    command.append("--no-wandb")
    log_path = args.out / "logs" / f"{method}_seed{seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{method} seed {seed}] running (log: {log_path})", flush=True)
    start = time.perf_counter()
    with log_path.open("a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    print(
        f"[{method} seed {seed}] exit {code} after {time.perf_counter() - start:.0f} s", flush=True
    )
    if code != 0:
        raise SystemExit(f"{method} seed {seed} failed; see {log_path}")


def collect(out: Path, seeds: list[int]) -> dict[str, Any]:
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in METHODS}
    for method in METHODS:
        for seed in seeds:
            folder = run_folder(out, method, seed)
            if (read(folder / "status.json") or {}).get("status") != "complete":
                continue
            metrics, costs = read(folder / "metrics.json"), read(folder / "costs.json")
            task = metrics.get("task") or {}
            row: dict[str, Any] = {
                "eval_loss": metrics["final"]["eval_loss"],
                "gsm8k_strict": task.get("strict-match"),
                "gsm8k_strict_stderr": task.get("strict-match_stderr"),
                "gsm8k_flexible": task.get("flexible-extract"),
                "gsm8k_flexible_stderr": task.get("flexible-extract_stderr"),
                "gsm8k_n": task.get("n"),
                "trainable_params": costs["trainable_params"],
                "train_flops_per_step": costs.get("train_flops_per_step"),
                "peak_memory_bytes": costs["peak_memory_bytes"],
                "run_wall_time_s": costs["wall_time_s"],
                "train_time_s": costs["train_time_s"],
            }
            summary = metrics.get("method") or {}
            if "allocation" in summary:
                row["cost_fractions_model"] = summary["allocation"]["cost_fractions"]
                row["adapted_modules"] = summary["allocation"]["adapted_modules"]
            if "control" in summary:
                row["control"] = summary["control"]
            search = read(folder / "search.json") if method == "strato" else None
            if search:
                row["search_wall_time_s"] = search["search_wall_time_s"]
                row["real_evaluations"] = search["real_evaluations"]
                row["search_stop_reason"] = search["stop_reason"]
                row["policy_parameters"] = search["policy"]["parameters"]
                row["allocation"] = read(folder / "allocation.json")
            runs[method][seed] = row
    return {"runs": runs, "aggregate": aggregate(runs, seeds), "criteria": criteria(runs, seeds)}


def mean_std(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def aggregate(runs: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    keys = (
        "eval_loss", "gsm8k_strict", "gsm8k_flexible", "trainable_params", "train_flops_per_step",
        "peak_memory_bytes", "run_wall_time_s", "search_wall_time_s", "real_evaluations",
    )  # fmt: skip
    out: dict[str, Any] = {}
    for method, by_seed in runs.items():
        out[method] = {
            k: mean_std([r[k] for r in by_seed.values() if r.get(k) is not None]) for k in keys
        }
    return out


def criteria(runs: dict[str, dict[int, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    """The issue's acceptance points, each with its numbers (``None`` when not measured)."""
    both = [s for s in seeds if s in runs["lora"] and s in runs["strato"]]
    if not both:
        return {"measured_seeds": []}

    def avg(method: str, key: str, subset: list[int]) -> float:
        return statistics.fmean(runs[method][s][key] for s in subset)

    params_ratio = avg("strato", "trainable_params", both) / avg("lora", "trainable_params", both)
    flops_ratio = avg("strato", "train_flops_per_step", both) / avg(
        "lora", "train_flops_per_step", both
    )
    lora_losses = [runs["lora"][s]["eval_loss"] for s in both]
    strato_losses = [runs["strato"][s]["eval_loss"] for s in both]
    spread = max(
        statistics.stdev(lora_losses) if len(both) > 1 else 0.0,
        statistics.stdev(strato_losses) if len(both) > 1 else 0.0,
    )
    gap = statistics.fmean(strato_losses) - statistics.fmean(lora_losses)
    result: dict[str, Any] = {
        "measured_seeds": both,
        "params_ratio": params_ratio,
        "train_flops_ratio": flops_ratio,
        "efficiency_met": params_ratio <= 0.7 or flops_ratio <= 0.8,
        "loss_gap_vs_lora": gap,
        "seed_spread": spread,
        "loss_met": gap <= spread,
    }
    with_random = [s for s in both if s in runs["random"]]
    if with_random:
        random_loss = avg("random", "eval_loss", with_random)
        result["loss_random"] = random_loss
        result["loss_strato_same_seeds"] = avg("strato", "eval_loss", with_random)
        result["beats_random"] = result["loss_strato_same_seeds"] < random_loss
    with_uniform = [s for s in both if s in runs["uniform"]]
    if with_uniform:
        result["loss_uniform"] = avg("uniform", "eval_loss", with_uniform)
        result["loss_strato_vs_uniform"] = (
            avg("strato", "eval_loss", with_uniform) - result["loss_uniform"]
        )
    search_ratios = [
        runs["strato"][s]["search_wall_time_s"] / runs["lora"][s]["run_wall_time_s"]
        for s in both
        if runs["strato"][s].get("search_wall_time_s") is not None
    ]
    if search_ratios:
        result["search_over_lora_run_wall"] = statistics.fmean(search_ratios)
        result["search_over_lora_run_wall_max"] = max(search_ratios)
        result["search_cost_met"] = max(search_ratios) <= 3.0
    return result


def fmt(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 4) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    agg = results["aggregate"]
    lines = [
        "| method | held-out loss | GSM8K strict | GSM8K flexible | trainable params | "
        "train GFLOP/step | peak RSS GiB | run wall s | search wall s | real evals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        a = agg.get(method) or {}
        if not a.get("eval_loss"):
            continue
        lines.append(
            f"| {method} | {fmt(a['eval_loss'])} | {fmt(a['gsm8k_strict'], 100, 1)} % | "
            f"{fmt(a['gsm8k_flexible'], 100, 1)} % | {fmt(a['trainable_params'], 1, 0)} | "
            f"{fmt(a['train_flops_per_step'], 1e-9, 1)} | {fmt(a['peak_memory_bytes'], 2**-30, 2)} | "
            f"{fmt(a['run_wall_time_s'], 1, 0)} | {fmt(a['search_wall_time_s'], 1, 0)} | "
            f"{fmt(a['real_evaluations'], 1, 1)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/strato_cpu_runs"))
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("STRATO_DATA_DIR", ROOT.parent / "shared" / "data")),
    )
    parser.add_argument(
        "--search-cap", type=float, default=2.0,
        help="STRATO's search wall-time cap as a multiple of the same seed's LoRA run",
    )  # fmt: skip
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summarize_only:
        if not (args.data / "gsm8k" / "train.jsonl").exists():
            raise SystemExit(f"no GSM8K in {args.data / 'gsm8k'} (set STRATO_DATA_DIR or --data)")
        for seed in args.seeds:
            for method in args.methods:
                run_one(method, seed, args)
                write(args, collect(args.out, args.seeds))
    results = collect(args.out, args.seeds)
    write(args, results)
    print(table(results))
    print(json.dumps(results["criteria"], indent=2))
    return 0


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    results = {
        "protocol": {
            "config": str(CONFIG.relative_to(ROOT)),
            "seeds": args.seeds,
            "search_cap_x_lora_run": args.search_cap,
            "command": "STRATO_DATA_DIR=../shared/data python benchmarks/strato_cpu/run.py",
        },
        **results,
    }
    tmp = args.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.results)


if __name__ == "__main__":
    raise SystemExit(main())
