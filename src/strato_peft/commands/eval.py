"""``strato-peft eval``: evaluate a run folder's adapter on its task (or another one).

A run folder holds ``config.yaml`` (the resolved config) and ``adapter/`` (peft
``save_pretrained``). The base model is loaded as the run loaded it, the adapter
put on top, and the task's evaluator run; the metrics go to ``eval_<task>.json``
and the per-item outputs to ``predictions_<task>.jsonl`` in the run folder, each
written to a temporary file and renamed, so a crash never leaves half a file::

    strato-peft eval --checkpoint results/smollm2/gsm8k/lora_rank8_seed42 --limit 50
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

from strato_peft.results import (
    ADAPTER_DIR,
    CONFIG_FILE,
    atomic_write_json,
    atomic_write_text,
    eval_file,
    predictions_file,
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strato-peft eval", description="Evaluate a run folder's adapter on a task."
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="run folder (config.yaml, adapter/)"
    )
    parser.add_argument("--task", default=None, help="task name (default: the run's task)")
    parser.add_argument(
        "--subset", default=None, help="task subset (default: the run's, for its task)"
    )
    parser.add_argument("--data-path", default=None, help="task data folder")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: training.eval_batch_size or 8"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)"
    )
    parser.add_argument("--no-adapter", action="store_true", help="evaluate the base model only")
    return parser


def _device(requested: str | None) -> Any:
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_run(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Load the run's model, adapter and task; evaluate; write the results. Returns (path, metrics)."""
    from strato_peft.config import load_config
    from strato_peft.config.schema import TaskConfig
    from strato_peft.tasks import load_task

    run_dir: Path = args.checkpoint
    config = load_config(run_dir / CONFIG_FILE)
    task_cfg = config.task
    if args.task is not None and args.task != task_cfg.name:
        task_cfg = TaskConfig(name=args.task, max_length=task_cfg.max_length)
    updates = {
        k: v for k, v in (("subset", args.subset), ("data_path", args.data_path)) if v is not None
    }
    task_cfg = task_cfg.model_copy(update=updates)
    task = load_task(TaskConfig.model_validate(task_cfg.model_dump()))

    from strato_peft.models import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    model: Any = load_model(config.model, seed=config.seed)
    adapter = run_dir / ADAPTER_DIR
    use_adapter = not args.no_adapter and adapter.is_dir()
    if use_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    elif not args.no_adapter:
        log.warning("%s has no adapter/ folder: evaluating the base model", run_dir)
    device = _device(args.device)
    model.to(device)
    batch_size = args.batch_size or config.training.eval_batch_size or 8
    metrics = task.evaluate(
        model, tokenizer, batch_size=batch_size, limit=args.limit, device=device
    )
    report = {
        "task": task.name,
        "subset": task.cfg.subset,
        "data_source": task.data_source,
        "checkpoint": str(run_dir),
        "adapter": use_adapter,
        "model": config.model.name,
        "limit": args.limit,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(device),
        "python": platform.python_version(),
    }
    out = run_dir / eval_file(task.name)
    atomic_write_json(out, report)
    predictions = getattr(task, "last_predictions", None)
    if predictions:
        lines = "".join(json.dumps(row) + "\n" for row in predictions)
        atomic_write_text(run_dir / predictions_file(task.name), lines)
    return out, report


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not (args.checkpoint / CONFIG_FILE).is_file():
        print(
            f"strato-peft eval: {args.checkpoint / CONFIG_FILE} not found (is it a run folder?)",
            file=sys.stderr,
        )
        return 1
    from strato_peft.config import ConfigError
    from strato_peft.tasks import DataError

    try:
        out, report = evaluate_run(args)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"strato-peft eval: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"written": str(out), **report["metrics"]}))
    return 0
