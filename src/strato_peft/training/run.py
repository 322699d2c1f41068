"""One experiment from config to a complete run folder.

Reads top to bottom: setup (folder, platform, accelerator, data, model, method),
train, evaluate, save, cleanup. The folder's ``status.json`` says ``running``,
``complete`` or ``failed``; ``metrics.json``, ``costs.json`` and ``adapter/`` are written
(atomically) only at the end, so a killed or failed run never looks complete. Running
the same command again resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strato_peft.config.schema import ExperimentConfig
from strato_peft.results import (
    ENV_FILE,
    atomic_directory,
    atomic_write_json,
    environment_info,
    run_dir,
    save_resolved_config,
)
from strato_peft.training.tracking import add_file_logs, remove_handlers, run_tag

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
COSTS_FILE = "costs.json"
ADAPTER_DIR = "adapter"
FAST_DEV_NEW_TOKENS = 16


@dataclass(frozen=True)
class RunOptions:
    """Command-line switches that change how (not what) a run trains."""

    fast_dev_run: bool = False
    resume: bool = False
    profile: bool = False


def read_status(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fast_dev_config(config: ExperimentConfig) -> ExperimentConfig:
    """A handful of steps on a slice of the data: same recipe, small numbers."""
    t, task = config.training, config.task
    return config.model_copy(
        update={
            "task": task.model_copy(
                update={
                    "limit": min(task.limit or 16, 16),
                    "eval_limit": min(task.eval_limit or 4, 4),
                }
            ),
            "training": t.model_copy(
                update={
                    "max_steps": min(t.max_steps or 4, 4),
                    "gradient_accumulation_steps": min(t.gradient_accumulation_steps, 2),
                    "eval_every_steps": 2,
                    "save_every_steps": 2,
                }
            ),
        }
    )


def run_experiment(config: ExperimentConfig, options: RunOptions) -> Path:
    """Train and evaluate one experiment; returns its run folder."""
    if options.fast_dev_run:
        config = fast_dev_config(config)
    folder = run_dir(config)
    status = read_status(folder)
    if status.get("status") == "complete":
        log.info("%s is already complete; nothing to do (delete it to run again)", folder)
        return folder

    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    from strato_peft.methods import get_method
    from strato_peft.methods.base import RunContext
    from strato_peft.models import load_model, load_tokenizer
    from strato_peft.platform import select_platform
    from strato_peft.tasks import load_task
    from strato_peft.training.checkpoint import latest_checkpoint
    from strato_peft.training.loop import Trainer, make_plan, peak_memory_bytes

    # -- setup ---------------------------------------------------------------------------
    platform = select_platform(config.device_info)
    accelerator = Accelerator(
        cpu=platform.name == "cpu",
        mixed_precision=platform.accelerate_mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    main = accelerator.is_main_process
    resuming = latest_checkpoint(folder) is not None
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        if not resuming:
            for stale in (METRICS_FILE, COSTS_FILE, ADAPTER_DIR):
                _remove(folder / stale)
        save_resolved_config(config, folder)
        atomic_write_json(
            folder / ENV_FILE,
            environment_info(
                config.seed,
                {
                    "platform": platform.describe(),
                    "num_processes": accelerator.num_processes,
                    "tag": run_tag(config),
                },
            ),
        )
        _write_status(folder, "running", resumed=resuming)
    accelerator.wait_for_everyone()
    log_dir = Path(config.logging.log_dir)
    handlers = (
        add_file_logs([folder / "training.log", log_dir / "training.log"], config.logging.level)
        if main
        else []
    )
    trainer: Trainer | None = None
    start = time.perf_counter()
    previous_handler = _raise_on_sigterm()
    try:
        set_seed(config.seed)
        log.info("run %s (%s)", folder, run_tag(config))
        task = load_task(config.task)
        if options.fast_dev_run and hasattr(task, "max_new_tokens"):
            task.max_new_tokens = min(task.max_new_tokens, FAST_DEV_NEW_TOKENS)
        tokenizer = load_tokenizer(config.model)
        n_train = len(task.train_examples())
        plan = make_plan(n_train, config, accelerator.num_processes)
        method = get_method(config.peft, total_steps=plan.total_steps)
        method.setup_run(
            RunContext(config, task, tokenizer, folder, accelerator, options.fast_dev_run)
        )
        base = load_model(config.model, seed=config.seed)
        if config.training.gradient_checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            # Non-reentrant checkpointing needs no input gradient; keeping it would run the
            # backward through every layer and cancel the saving of upper-layer adapters.
            base.disable_input_require_grads()
        model = method.build(base)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "%s: %d train examples (%s), %d optimizer steps, %s trainable params",
            config.peft.method, n_train, task.data_source, plan.total_steps, f"{trainable:,}",
        )  # fmt: skip
        profile_dir = log_dir / "profiles" if (options.profile or config.logging.profile) else None
        trainer = Trainer(
            config, accelerator=accelerator, model=model, method=method, task=task,
            tokenizer=tokenizer, folder=folder, profile_dir=profile_dir,
        )  # fmt: skip
        if not trainer.resume():
            set_seed(config.seed)
        trainer.count_step_flops()

        # -- train ---------------------------------------------------------------------------
        trainer.train()

        # -- evaluate ------------------------------------------------------------------------
        final: dict[str, Any] = {"eval_loss": trainer.evaluate_loss()}
        task_metrics: dict[str, Any] = {}
        if config.task.final_eval and main:
            unwrapped = accelerator.unwrap_model(trainer.model)
            unwrapped.eval()
            task_metrics = task.evaluate(
                unwrapped, tokenizer, batch_size=config.training.eval_batch_size or config.training.batch_size,
                device=accelerator.device,
            )  # fmt: skip
        accelerator.wait_for_everyone()

        # -- save ----------------------------------------------------------------------------
        if main:
            history = trainer.state.history
            # The rank schedule resizes adapters: report what the final adapter holds.
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            final["train_loss"] = history[-1]["loss"] if history else None
            wall = time.perf_counter() - start
            atomic_write_json(
                folder / COSTS_FILE,
                {
                    "trainable_params": trainable,
                    "total_params": sum(p.numel() for p in model.parameters()) - trainable,
                    "wall_time_s": wall,
                    "train_time_s": trainer.train_seconds,
                    "tokens_trained": trainer.state.tokens,
                    "tokens_per_s": trainer.state.tokens / trainer.train_seconds
                    if trainer.train_seconds
                    else None,
                    "peak_memory_bytes": peak_memory_bytes(accelerator.device),
                    "peak_memory_kind": "cuda max_memory_allocated"
                    if accelerator.device.type == "cuda"
                    else "process peak RSS",
                    **trainer.measured_flops,
                },
            )
            if config.output.save_adapter:
                _save_adapter(accelerator.unwrap_model(trainer.model), folder / ADAPTER_DIR)
            atomic_write_json(
                folder / METRICS_FILE,
                {
                    "final": final,
                    "task": task_metrics,
                    "history": history,
                    "steps": trainer.state.step,
                    "plan": trainer.plan.__dict__,
                    "data_source": task.data_source,
                    "fast_dev_run": options.fast_dev_run,
                    "method": method.summary(),
                },
            )
            trainer.trackers.log(
                {f"final/{k}": v for k, v in final.items() if isinstance(v, float)},
                trainer.state.step,
            )
            _write_status(folder, "complete")
            log.info("complete: %s (eval loss %.4f)", folder, final["eval_loss"])
    except BaseException as exc:
        if main:
            error = (
                "interrupted by SIGTERM"
                if isinstance(exc, Interrupted)
                else f"{type(exc).__name__}: {exc}"
            )
            _write_status(folder, "failed", error=error)
        if trainer is not None:
            trainer.close(failed=True)
            trainer = None
        raise
    finally:
        if trainer is not None:
            trainer.close()
        remove_handlers(handlers)
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return folder


class Interrupted(SystemExit):
    """SIGTERM during a run: the folder is marked failed and the run can resume."""


def _raise_on_sigterm() -> Any:
    """Turn SIGTERM (``kill``, a scheduler's pre-emption) into an exception, so the run
    folder is marked failed instead of staying ``running``; only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def _write_status(folder: Path, status: str, **extra: Any) -> None:
    previous = read_status(folder)
    data = {"status": status, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    data["started_at"] = (
        previous.get("started_at", data["updated_at"])
        if status != "running"
        else data["updated_at"]
    )
    atomic_write_json(folder / STATUS_FILE, data)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _save_adapter(model: Any, target: Path) -> None:
    """``save_pretrained`` into a temporary folder, then rename (never half an adapter)."""
    from strato_peft.methods.resize import save_adapter

    with atomic_directory(target) as tmp:
        save_adapter(model, tmp)
