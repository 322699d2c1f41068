#!/usr/bin/env python
"""Dynamic rank schedule vs static LoRA on SmolLM2-135M with real GSM8K, on a 2-core CPU.

Both arms train LoRA (q_proj, v_proj, initial rank 8 everywhere) with the same recipe and
seed; the ``schedule`` arm moves rank between modules during training
(``peft.rank_schedule``), never above the static arm's trainable params. The score is the
held-out answer-token loss on ``eval_limit`` GSM8K test problems (lower is better), for
seeds 42, 43, 44; runs alternate static/schedule per seed so that background load hits
both alike. Writes ``benchmarks/rank_schedule_cpu/results.json`` after every run::

    STRATO_DATA_DIR=/work/shared/data python benchmarks/rank_schedule_cpu/run.py
    python benchmarks/rank_schedule_cpu/run.py --data-path DIR --steps 8 --seeds 42   # smoke

Run folders go to ``--out`` (default: a folder under /tmp), never into the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "experiments" / "cpu_smollm2_gsm8k_lora.yaml"
RESULTS = Path(__file__).resolve().parent / "results.json"

#: The schedule arm's settings (fractions of the run, see docs/rank_schedule.md).
SCHEDULE = {
    "enabled": "true",
    "warmup": "0.25",
    "final_freeze": "0.2",
    "interval": "0.125",
    "importance": "sensitivity",
    "move_fraction": "0.25",
    "rank_step": "2",
    "min_rank": "2",
    "max_rank": "16",
}


def overrides(args: argparse.Namespace, arm: str, out: Path) -> list[str]:
    items = [
        f"output.dir={out / arm}",
        f"logging.log_dir={out / 'logs'}",
        "logging.wandb=false",
        "logging.tensorboard=false",
        "output.save_adapter=false",
        "peft.rank=8",
        "peft.alpha=16",
        "peft.dropout=0.05",
        "peft.target_modules=[q_proj,v_proj]",
        f"task.max_length={args.max_length}",
        f"task.limit={args.limit}",
        f"task.eval_limit={args.eval_limit}",
        "task.final_eval=false",
        f"training.batch_size={args.batch_size}",
        "training.eval_batch_size=16",
        "training.gradient_accumulation_steps=1",
        f"training.learning_rate={args.lr}",
        f"training.max_steps={args.steps}",
        "training.warmup_ratio=0.1",
        "training.eval_every_steps=null",
        "training.save_every_steps=null",
    ]
    if args.data_path:
        items.append(f"task.data_path={args.data_path}")
    if arm == "schedule":
        items += [f"peft.rank_schedule.{k}={v}" for k, v in SCHEDULE.items()]
    return items


def run_one(args: argparse.Namespace, arm: str, seed: int, out: Path) -> dict[str, Any]:
    from strato_peft.config import load_config
    from strato_peft.training.run import RunOptions, run_experiment

    config = load_config(CONFIG, overrides(args, arm, out), seed=seed)
    start = time.perf_counter()
    folder = run_experiment(config, RunOptions())
    metrics = json.loads((folder / "metrics.json").read_text())
    costs = json.loads((folder / "costs.json").read_text())
    schedule = metrics.get("method", {}).get("rank_schedule", {})
    return {
        "arm": arm,
        "seed": seed,
        "eval_loss": metrics["final"]["eval_loss"],
        "train_loss": metrics["final"]["train_loss"],
        "trainable_params_final": costs["trainable_params"],
        "budget_params": schedule.get("budget_params", costs["trainable_params"]),
        "events": schedule.get("events", 0),
        "grows": schedule.get("grows", 0),
        "shrinks": schedule.get("shrinks", 0),
        "train_time_s": costs["train_time_s"],
        "wall_s": time.perf_counter() - start,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm in ("static", "schedule"):
        losses = [r["eval_loss"] for r in runs if r["arm"] == arm]
        if losses:
            arms[arm] = {
                "eval_loss_mean": statistics.mean(losses),
                "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "n": len(losses),
            }
    paired = [
        (s["eval_loss"], d["eval_loss"])
        for s in runs
        if s["arm"] == "static"
        for d in runs
        if d["arm"] == "schedule" and d["seed"] == s["seed"]
    ]
    if paired:
        diffs = [d - s for s, d in paired]
        arms["schedule_minus_static"] = {
            "mean": statistics.mean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "per_seed": diffs,
            "ratio_mean": statistics.mean(d / s for s, d in paired),
        }
    return arms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", default=None, help="GSM8K folder (else $STRATO_DATA_DIR)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, default=256, help="training examples")
    parser.add_argument("--eval-limit", type=int, default=48, help="held-out examples")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/rank_schedule_cpu"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / stamp
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in args.seeds:
        for arm in ("static", "schedule"):
            runs.append(run_one(args, arm, seed, out))
            r = runs[-1]
            print(
                f"seed {seed} {arm:8s} eval_loss {r['eval_loss']:.4f} params "
                f"{r['trainable_params_final']:,} (budget {r['budget_params']:,}) "
                f"{r['wall_s']:.0f} s",
                flush=True,
            )
            summary = summarise(runs)
            args.results.write_text(
                json.dumps(
                    {
                        "command": " ".join(["python", *sys.argv]),
                        "date_utc": stamp,
                        "complete": len(runs) == 2 * len(args.seeds),
                        "total_wall_s": time.perf_counter() - started,
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                        "settings": {
                            k: v for k, v in vars(args).items() if k not in ("out", "results")
                        },
                        "schedule": SCHEDULE,
                        "summary": summary,
                        "runs": runs,
                    },
                    indent=1,
                )
                + "\n"
            )
    s = summarise(runs)
    print("\nheld-out loss (mean +- std over seeds):")
    for arm in ("static", "schedule"):
        if arm in s:
            print(f"  {arm:8s} {s[arm]['eval_loss_mean']:.4f} +- {s[arm]['eval_loss_std']:.4f}")
    if "schedule_minus_static" in s:
        d = s["schedule_minus_static"]
        print(
            f"  schedule - static: {d['mean']:+.4f} +- {d['std']:.4f} "
            f"(ratio {d['ratio_mean']:.4f}); per seed {[f'{x:+.4f}' for x in d['per_seed']]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
