"""STRATO v2 CPU evidence, the rows beside the main protocol: learning-rate grid, alpha
policy, proxy calibration and the levers of the search (seed 42 unless a job says).

The main protocol (``run_v2.py``) trains every arm at one learning rate, the LoRA
sweep's best. The jobs here answer what it leaves open, each a ``main.py`` process of
``configs/experiments/cpu_smollm2_gsm8k_strato_v2.yaml`` plus overrides, strictly one
after another, in this order (cheapest answers to the issue's questions first):

* ``lever-gain-mass``: the search with the surrogate's gain per slot weighted by the
  slot's size (``peft.strato.search.surrogate_gain=mass``), the fix the first v2
  reading pointed to (the per-parameter gain counts a module's size twice); seed 42
  first, then 43 and 44 (it moved seed 42's loss the most of any lever);
* ``lr-*``: the learning-rate grid. LoRA at 1e-2 (the sweep's best, 5e-3, was its
  largest value), and every other arm at 2.5e-3 and 1e-2: STRATO's and random-search's
  winners replayed from scratch (``control=replay``), uniform, band and random matched on
  STRATO's allocation of the main protocol, so each arm's own best learning rate (on
  the search split) can be read beside the shared one;
* ``alpha-*``: the alpha policy as ablation rows: LoRA, STRATO's winner and band under
  rsLoRA and under alpha proportional to rank (LoRA r16 is the reference rank, so
  proportional leaves it unchanged and it is not repeated);
* ``calib-*``: the proxy's calibration. Every first-rung candidate of STRATO's and
  random-search's seed-42 searches, trained to the end (32 steps) from scratch, so the
  Spearman correlation of each rung's search-split loss with the final report-split
  loss is measured on candidates that have both (the winners' final runs are the
  main protocol's);
* ``lever-*``: more levers of the search (space: the per-slot search of v1 at the same
  step budget; probe: the surrogate without it, each slot weighed by its size;
  fidelity: rungs of 8 and 16 steps); random-search's calibration comes last.

A complete run folder is not repeated: ``--next`` runs the first incomplete job and
exits (3 when none is left), so a shell loop resumes the queue and picks up a changed
job list between jobs. After every job ``results_v2_ablations.json`` is rewritten.

    STRATO_DATA_DIR=../shared/data sh -c \\
      'while python benchmarks/strato_cpu/run_v2_ablations.py --next; do :; done'
    python benchmarks/strato_cpu/run_v2_ablations.py --summarize-only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_v2 import CONFIG, LABELS, ROOT, folder, row_at  # noqa: E402

from strato_peft.costs import module_name  # noqa: E402
from strato_peft.results import (  # noqa: E402
    COMPLETE,
    SEARCH_FILE,
    atomic_write_json,
    read_json_or,
    read_status,
)

OUTPUT = HERE / "results_v2_ablations.json"
LR = 5.0e-3  # the main protocol's learning rate (the LoRA sweep's best)
GRID = (2.5e-3, 1.0e-2)
N_LAYERS = 30  # SmolLM2-135M
LABELS = {**LABELS, "replay": "strato-replay_rank16"}


@dataclass
class Job:
    name: str
    lever: str
    arm: str  # the run's kind: lora, strato, random-search, uniform, band, random, replay
    of: str  # what the row stands for (the arm it measures)
    seed: int = 42
    lr: float = LR
    overrides: list[str] = field(default_factory=list)
    note: str = ""
    group: str = ""  # the output folder (default: the name); seeds of one row share it

    @property
    def root(self) -> str:
        return self.group or self.name

    def folder(self, out: Path) -> Path:
        root = out / "ablations" / self.root
        return root / "smollm2_135m" / "gsm8k" / f"{LABELS[self.arm]}_seed{self.seed}"

    def command(self, out: Path) -> list[str]:
        items = [
            f"output.dir={out / 'ablations' / self.root}",
            f"training.learning_rate={self.lr}",
            *self.overrides,
        ]
        if self.arm == "lora":
            items.append("peft.method=lora")
        elif self.arm != "strato":
            items.append(f"peft.strato.control={self.arm}")
        command = [sys.executable, str(ROOT / "main.py"), "--config", str(CONFIG)]
        command += ["--seed", str(self.seed)]
        for item in items:
            command += ["--override", item]
        return command


def main_folder(out: Path, arm: str, seed: int = 42) -> Path:
    return folder(out, LR, arm, seed)


def candidate_files(out: Path, arm: str) -> list[tuple[str, Path]]:
    """The first-rung candidates of ``arm``'s seed-42 search but its winner, each written
    as an allocation JSON file (for ``control=replay``)."""
    search = read_json_or(main_folder(out, arm) / SEARCH_FILE, {})
    if not search.get("complete"):
        return []
    files = []
    for row in search["candidates"]:
        if row["hash"] == search["winner"]["hash"]:
            continue
        low, ranks = row["choice"]["lowest_layer"], row["choice"]["ranks"]
        allocation = {
            module_name(layer, t): r
            for layer in range(low, N_LAYERS)
            for t, r in sorted(ranks.items())
            if r
        }
        path = out / "ablations" / "calibration" / f"{arm}-{row['hash']}.json"
        if not path.exists():
            atomic_write_json(path, allocation)
        files.append((row["hash"], path))
    return files


def jobs(out: Path) -> list[Job]:
    strato, rsearch = main_folder(out, "strato"), main_folder(out, "random-search")
    from_strato = [f"peft.strato.control_from={strato}"]
    listed = [
        Job("lever-gain-mass", "surrogate gain", "strato", "strato",
            overrides=["peft.strato.search.surrogate_gain=mass"],
            note="mass (per-parameter sensitivity x slot size)"),
        Job("lr-lora-0.01", "learning rate", "lora", "lora", lr=1.0e-2),
        *(Job(f"lever-gain-mass-{seed}", "surrogate gain", "strato", "strato", seed=seed,
              overrides=["peft.strato.search.surrogate_gain=mass"], group="lever-gain-mass",
              note="mass (per-parameter sensitivity x slot size)")
          for seed in (43, 44)),
    ]  # fmt: skip
    for policy in ("rslora", "proportional"):
        base = [f"peft.alpha_policy={policy}"]
        if policy == "rslora":
            listed.append(
                Job(f"alpha-{policy}-lora", "alpha policy", "lora", "lora", overrides=base)
            )
        listed += [
            Job(f"alpha-{policy}-strato", "alpha policy", "replay", "strato",
                overrides=[*base, *from_strato], note="STRATO's winner, from scratch"),
            Job(f"alpha-{policy}-band", "alpha policy", "band", "band",
                overrides=[*base, *from_strato]),
        ]  # fmt: skip
    for lr in GRID:
        listed += [
            Job(f"lr-strato-{lr:g}", "learning rate", "replay", "strato", lr=lr,
                overrides=from_strato, note="STRATO's winner, from scratch"),
            Job(f"lr-random-search-{lr:g}", "learning rate", "replay", "random-search", lr=lr,
                overrides=[f"peft.strato.control_from={rsearch}"],
                note="random-search's winner, from scratch"),
            *(Job(f"lr-{arm}-{lr:g}", "learning rate", arm, arm, lr=lr, overrides=from_strato)
              for arm in ("uniform", "band", "random")),
        ]  # fmt: skip
    calib = {
        arm: [
            Job(f"calib-{arm}-{key}", "proxy calibration", "replay", arm,
                overrides=[f"peft.strato.control_from={path}"],
                note=f"first-rung candidate {key} of {arm}'s seed-42 search")
            for key, path in candidate_files(out, arm)
        ]
        for arm in ("strato", "random-search")
    }  # fmt: skip
    listed += calib["strato"]
    listed += [
        Job("lever-per-slot", "space", "strato", "strato",
            overrides=["peft.strato.search.mode=per_slot", "peft.strato.search.evaluations=7",
                       "peft.strato.search.steps_per_evaluation=8"],
            note="v1's per-slot space, 7 evaluations of 8 steps (the same 56 step-equivalents)"),
        Job("lever-gain-size", "surrogate gain", "strato", "strato",
            overrides=["peft.strato.search.surrogate_gain=size"],
            note="size (no probe: every parameter alike)"),
        Job("lever-rungs-8-16", "fidelity", "strato", "strato",
            overrides=["peft.strato.search.rungs=[8,16]", "peft.strato.search.proposals=[2,1]"],
            note="3 candidates, rungs of 8 and 16 steps (instead of 6 at 4, 8, 16)"),
    ]  # fmt: skip
    listed += calib["random-search"]
    names = [j.name for j in listed]
    assert len(names) == len(set(names)), "job names must be unique"
    return listed


def run_next(out: Path) -> bool:
    """Run the first incomplete job; False when none is left."""
    for job in jobs(out):
        if read_status(job.folder(out)).get("status") == COMPLETE:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {job.name}", flush=True)
        with open(out / "ablations.log", "a", encoding="utf-8") as handle:
            done = subprocess.run(
                job.command(out), cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=False
            )
        if done.returncode != 0:
            raise SystemExit(f"{job.name} failed (exit {done.returncode}); see {out}/ablations.log")
        return True
    return False


def summarize(out: Path) -> None:
    rows = []
    for job in jobs(out):
        entry = row_at(out, job.folder(out), job.of, job.seed, main_folder(out, "lora", job.seed))
        if entry is None:
            continue
        entry.update(
            {"job": job.name, "lever": job.lever, "kind": job.arm, "learning_rate": job.lr,
             "overrides": job.overrides, "note": job.note,
             "group": job.root, "folder": str(job.folder(out).relative_to(out))}
        )  # fmt: skip
        rows.append(entry)
    report = {
        "calibration": calibration(out, rows),
        "protocol": {
            "main": "results_v2.json (every arm x 3 seeds at learning rate 5e-3)",
            "seed": 42, "grid": [GRID[0], LR, GRID[1]],
            "selection": "each arm's learning rate is chosen on the search split (search_loss), "
            "never the report split",
        },
        "runs": rows,
    }  # fmt: skip
    atomic_write_json(OUTPUT, report)


def calibration(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per searched arm (seed 42): each first-rung candidate's rung losses on the search
    split and its final report-split loss (trained to the end: its calibration run, or
    the main protocol's run for the winner), and the Spearman correlation of every
    rung's loss with the final loss over the candidates that have both."""
    from strato_peft.strato.halving import spearman

    result: dict[str, Any] = {}
    for arm in ("strato", "random-search"):
        search = read_json_or(main_folder(out, arm) / SEARCH_FILE, {})
        main_row = row_at(out, main_folder(out, arm), arm, 42, main_folder(out, "lora"))
        if not search.get("complete") or main_row is None:
            continue
        final = {r["job"].removeprefix(f"calib-{arm}-"): r["report_loss"]
                 for r in rows if r["job"].startswith(f"calib-{arm}-")}  # fmt: skip
        final[search["winner"]["hash"]] = main_row["report_loss"]
        candidates = [
            {"hash": c["hash"], "choice": c["choice"], "source": c["source"],
             "losses": c["losses"], "final_report_loss": final.get(c["hash"])}
            for c in search["candidates"]
        ]  # fmt: skip
        correlations = {}
        for rung in search["rungs"]:
            pairs = [(c["losses"][str(rung)], c["final_report_loss"]) for c in candidates
                     if str(rung) in c["losses"] and c["final_report_loss"] is not None]  # fmt: skip
            correlations[str(rung)] = {
                "n": len(pairs),
                "spearman": spearman([a for a, _ in pairs], [b for _, b in pairs]),
            }
        result[arm] = {"candidates": candidates, "spearman_vs_final_report_loss": correlations}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "strato_cpu_v2")
    parser.add_argument("--next", action="store_true", help="run the first incomplete job")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the jobs and their state")
    args = parser.parse_args()
    if args.list:
        for job in jobs(args.out):
            state = read_status(job.folder(args.out)).get("status", "-")
            print(f"{job.name:40s} {state}")
        return
    if args.next:
        if not os.environ.get("STRATO_DATA_DIR"):
            parser.error("set STRATO_DATA_DIR (the folder with gsm8k/)")
        ran = run_next(args.out)
        summarize(args.out)
        raise SystemExit(0 if ran else 3)
    summarize(args.out)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
