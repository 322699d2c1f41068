"""One experiment from config to a complete run folder.

:func:`run_experiment` reads top to bottom, one function per phase: setup (folder,
platform, accelerator, logs), build (task, tokenizer, method, model, trainer), train,
evaluate, save. The folder's ``status.json`` says ``running``, ``complete`` or
``failed``; ``metrics.json``, ``costs.json`` and ``adapter/`` are written (atomically)
only at the end, so a killed or failed run never looks complete. Running the same
command again resumes from the newest checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strato_peft.config.schema import ExperimentConfig
from strato_peft.methods import run_folder
from strato_peft.results import (
    ADAPTER_DIR,
    COMPLETE,
    COMPLETE_OUTPUTS,
    COSTS_FILE,
    ENV_FILE,
    FAILED,
    METRICS_FILE,
    RUNNING,
    TRAINING_LOG,
    atomic_directory,
    atomic_write_json,
    config_differences,
    environment_info,
    read_status,
    remove,
    save_resolved_config,
    write_status,
)
from strato_peft.training.tracking import add_file_logs, remove_handlers, run_tag

log = logging.getLogger(__name__)

FAST_DEV_NEW_TOKENS = 16


@dataclass(frozen=True)
class RunOptions:
    """Command-line switches that change how (not what) a run trains."""

    fast_dev_run: bool = False
    resume: bool = False
    profile: bool = False
    resume_anyway: bool = False
    """Reuse or resume a folder whose run used a different config (its keys are logged)."""


@dataclass
class Session:
    """What the setup phase made: the folder, the platform and the accelerator."""

    config: ExperimentConfig
    options: RunOptions
    folder: Path
    platform: Any
    accelerator: Any
    started: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)


@dataclass
class Parts:
    """What the build phase made."""

    task: Any
    tokenizer: Any
    method: Any
    model: Any
    trainer: Any


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
    folder = run_folder(config, fast_dev_run=options.fast_dev_run)
    reused = check_identity(config, folder, options)
    if read_status(folder).get("status") == COMPLETE:
        if reused:
            log.warning("%s", reused)
        log.info("%s is already complete; nothing to do (delete it to run again)", folder)
        return folder
    session = setup(config, options, folder)
    handlers = (
        add_file_logs(
            [folder / TRAINING_LOG, Path(config.logging.log_dir) / TRAINING_LOG],
            config.logging.level,
        )
        if session.main
        else []
    )
    if reused:
        log.warning("%s", reused)
    parts: Parts | None = None
    previous_handler = _raise_on_sigterm()
    try:
        parts = build(session)
        parts.trainer.train()
        final, task_metrics = evaluate(session, parts)
        save(session, parts, final, task_metrics)
    except BaseException as exc:
        if session.main:
            error = "interrupted by SIGTERM" if isinstance(exc, Interrupted) else _describe(exc)
            write_status(folder, FAILED, error=error)
        if parts is not None:
            parts.trainer.close(failed=True)
            parts = None
        raise
    finally:
        if parts is not None:
            parts.trainer.close()
        remove_handlers(handlers)
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return folder


class RunIdentityError(ValueError):
    """A run folder holds (part of) a run of another config."""


def check_identity(config: ExperimentConfig, folder: Path, options: RunOptions) -> str | None:
    """A folder whose complete or partial run used another config is never reused or
    resumed silently: :class:`RunIdentityError` names the differing keys, unless
    ``--resume-anyway`` (then the returned warning names them, for the run's log). A
    folder with nothing trained yet (no checkpoint, not complete) starts afresh."""
    from strato_peft.training.checkpoint import latest_checkpoint

    differing = config_differences(folder, config)
    if not differing:
        return None
    complete = read_status(folder).get("status") == COMPLETE
    if not complete and latest_checkpoint(folder) is None:
        return None
    shown = ", ".join(differing[:6]) + (
        f" and {len(differing) - 6} more" if len(differing) > 6 else ""
    )
    what = "a complete run" if complete else "a partial run (checkpoints)"
    if options.resume_anyway:
        return f"{folder} holds {what} of another config ({shown}): reused (--resume-anyway)"
    raise RunIdentityError(
        f"{folder} holds {what} of another config: {shown} differ. Set a new output.dir, "
        "delete the folder, or pass --resume-anyway to reuse it as it is"
    )


def setup(config: ExperimentConfig, options: RunOptions, folder: Path) -> Session:
    """Platform and accelerator; the folder's config, environment and ``running`` status."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from strato_peft.platform import PlatformError, select_platform
    from strato_peft.training.checkpoint import latest_checkpoint

    platform = select_platform(config.device_info)
    accelerator = Accelerator(
        cpu=platform.name == "cpu",
        mixed_precision=platform.accelerate_mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    if config.model.device_map and accelerator.num_processes > 1:
        raise PlatformError(
            f"model.device_map={config.model.device_map!r} spreads one model over the GPUs of "
            f"one process; this launch has {accelerator.num_processes} processes (DDP keeps a "
            "whole model per process): unset model.device_map, or launch one process"
        )
    if config.device_info.compile_model and not platform.supports_compile:
        raise PlatformError(
            f"device_info.compile_model: torch.compile is not supported on {platform.name}; "
            "set it to false"
        )
    session = Session(config, options, folder, platform, accelerator)
    if session.main:
        resuming = latest_checkpoint(folder) is not None
        folder.mkdir(parents=True, exist_ok=True)
        if not resuming:
            for stale in COMPLETE_OUTPUTS:
                remove(folder / stale)
        save_resolved_config(config, folder)
        extra = {
            "platform": platform.describe(),
            "num_processes": accelerator.num_processes,
            "tag": run_tag(config),
        }
        atomic_write_json(folder / ENV_FILE, environment_info(config.seed, extra))
        write_status(folder, RUNNING, resumed=resuming)
    accelerator.wait_for_everyone()
    return session


def build(session: Session) -> Parts:
    """Task, tokenizer, method and base model; the adapter (STRATO searches here); the
    trainer, resumed from the newest checkpoint when there is one."""
    from accelerate.utils import set_seed

    from strato_peft.methods import get_method
    from strato_peft.methods.base import RunContext
    from strato_peft.models import load_model, load_tokenizer
    from strato_peft.tasks import load_task
    from strato_peft.training.loop import Trainer, make_plan

    config, accelerator = session.config, session.accelerator
    set_seed(config.seed)
    log.info("run %s (%s)", session.folder, run_tag(config))
    task = load_task(config.task)
    task.check_data()  # the report and test data fail now, not after the last step
    if session.options.fast_dev_run and hasattr(task, "max_new_tokens"):
        task.max_new_tokens = min(task.max_new_tokens, FAST_DEV_NEW_TOKENS)
    tokenizer = load_tokenizer(config.model)
    n_train = len(task.train_examples())
    plan = make_plan(n_train, config, accelerator.num_processes)
    method = get_method(config.peft, total_steps=plan.total_steps)
    method.setup_run(
        RunContext(
            config, task, tokenizer, session.folder, accelerator, session.options.fast_dev_run
        )
    )
    base = load_model(config.model, seed=config.seed)
    if config.training.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Non-reentrant checkpointing needs no input gradient; keeping it would run the
        # backward through every layer and cancel the saving of upper-layer adapters.
        base.disable_input_require_grads()
    model = method.build(base)
    log.info(
        "%s: %d train examples (%s), %d optimizer steps, %s trainable params",
        config.peft.method, n_train, task.data_source, plan.total_steps,
        f"{_trainable(model):,}",
    )  # fmt: skip
    profile = session.options.profile or config.logging.profile
    trainer = Trainer(
        config, accelerator=accelerator, model=model, method=method, task=task,
        tokenizer=tokenizer, folder=session.folder,
        profile_dir=Path(config.logging.log_dir) / "profiles" if profile else None,
    )  # fmt: skip
    if not trainer.resume():
        set_seed(config.seed)
    trainer.count_step_flops()
    return Parts(task, tokenizer, method, model, trainer)


def evaluate(session: Session, parts: Parts) -> tuple[dict[str, Any], dict[str, Any]]:
    """Held-out loss (all processes), then the task's evaluator (main process)."""
    config, accelerator, trainer = session.config, session.accelerator, parts.trainer
    final: dict[str, Any] = {}
    if accelerator.num_processes > 1:  # the sharded loss, every process taking part
        final["eval_loss"] = trainer.evaluate_loss()
    task_metrics: dict[str, Any] = {}
    if session.main:  # one pass over the report split: loss, accuracy, their intervals
        report = trainer.report_stats()
        final.update(
            report
            if "eval_loss" not in final
            else {k: v for k, v in report.items() if k != "eval_loss"}
        )
        search_split = parts.task.search_examples()
        if search_split:  # what a learning-rate sweep may choose on (never the report split)
            final["search_loss"] = trainer.split_loss(search_split)
    if config.task.final_eval and session.main:
        unwrapped = accelerator.unwrap_model(trainer.model)
        unwrapped.eval()
        task_metrics = parts.task.evaluate(
            unwrapped, parts.tokenizer,
            batch_size=config.training.eval_batch_size or config.training.batch_size,
            device=accelerator.device,
        )  # fmt: skip
    accelerator.wait_for_everyone()
    history = trainer.state.history
    final["train_loss"] = history[-1]["loss"] if history else None
    if session.main:  # the report split and the task's evaluation run there only
        check_results(final, task_metrics)
    return final, task_metrics


class EmptyResultError(ValueError):
    """A run whose evaluation measured nothing, or measured NaN: it fails, never completes."""


def check_results(final: dict[str, Any], task_metrics: dict[str, Any]) -> None:
    """Fail the run when the report split had no example or a reported number is NaN or
    infinite (a diverged training, an empty test file): such a folder must not look
    complete, nor enter an average."""
    import math

    if not final.get("n") or not final.get("answer_tokens") or final.get("eval_loss") is None:
        raise EmptyResultError(
            "the held-out evaluation scored no example (is the report split or the test "
            "file empty? see task.eval_limit and the data files)"
        )
    if task_metrics and task_metrics.get("n", 1) == 0:
        raise EmptyResultError("the task's evaluation scored no example (is test.jsonl empty?)")
    bad = [
        f"{where}.{key}"
        for where, values in (("final", final), ("task", task_metrics))
        for key, value in values.items()
        if isinstance(value, float) and not math.isfinite(value)
    ]
    if bad:
        raise EmptyResultError(
            f"the evaluation measured non-finite values ({', '.join(bad[:5])}): the training "
            "diverged or the evaluation data is empty; the run is marked failed"
        )


def save(
    session: Session, parts: Parts, final: dict[str, Any], task_metrics: dict[str, Any]
) -> None:
    """Costs, adapter and metrics (each atomically), then the ``complete`` status."""
    if not session.main:
        return
    from strato_peft.training.loop import peak_memory_bytes

    config, folder, trainer = session.config, session.folder, parts.trainer
    device = session.accelerator.device
    trainable = _trainable(parts.model)  # the rank schedule resizes: what the adapter holds
    seconds = trainer.train_seconds
    costs = {
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in parts.model.parameters()) - trainable,
        "wall_time_s": time.perf_counter() - session.started,
        "train_time_s": seconds,
        "tokens_trained": trainer.state.tokens - trainer.adopted_tokens,
        "tokens_per_s": (trainer.state.tokens - trainer.adopted_tokens) / seconds
        if seconds
        else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": (
            "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"
        ),
        **trainer.measured_flops,
        **_cost_model_figures(config, session.accelerator.unwrap_model(trainer.model)),
    }
    atomic_write_json(folder / COSTS_FILE, costs)
    if config.output.save_adapter:
        _save_adapter(session.accelerator.unwrap_model(trainer.model), folder / ADAPTER_DIR)
    metrics = {
        "final": final,
        "task": task_metrics,
        "history": trainer.state.history,
        "steps": trainer.state.step,
        "plan": trainer.plan.__dict__,
        "data_source": parts.task.data_source,
        "fast_dev_run": session.options.fast_dev_run,
        "method": parts.method.summary(),
    }
    atomic_write_json(folder / METRICS_FILE, metrics)
    trainer.trackers.log(
        {f"final/{k}": v for k, v in final.items() if isinstance(v, float)}, trainer.state.step
    )
    write_status(folder, COMPLETE)
    log.info("complete: %s (eval loss %.4f)", folder, final["eval_loss"])


def _cost_model_figures(config: ExperimentConfig, model: Any) -> dict[str, Any]:
    """The cost model's FLOPs per optimizer step of the trained adapter, written into
    ``costs.json`` so the analysis compares runs on the same formulas by reading files
    only (it never builds a model from a run folder's config)."""
    from strato_peft.dry_run import cost_estimate

    try:
        figures = cost_estimate(config, model)
    except Exception as exc:  # an architecture the cost model does not know
        log.warning("cost model unavailable for this model (%s): costs.json keeps the "
                    "measured FLOPs only", exc)  # fmt: skip
        return {}
    return {"cost_model_train_flops_per_step": figures["train_flops_per_step"]}


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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _save_adapter(model: Any, target: Path) -> None:
    """``save_pretrained`` into a temporary folder, then rename (never half an adapter)."""
    from strato_peft.methods.resize import save_adapter

    with atomic_directory(target) as tmp:
        save_adapter(model, tmp)
