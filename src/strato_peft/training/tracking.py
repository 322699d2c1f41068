"""Where a run reports: log files, TensorBoard, Weights & Biases, the profiler.

Optional integrations import lazily. WandB never prompts: without an API key it runs
in offline mode (``wandb sync`` uploads later); when the package is missing, the run
goes on without it and says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from strato_peft.config.schema import ExperimentConfig
from strato_peft.results import TENSORBOARD_DIR

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_tag(config: ExperimentConfig) -> str:
    """The spec's experiment tag ``model/task/phase/lambdaX_rankY_seedZ``."""
    from strato_peft.methods import method_class

    lam = method_class(config.peft.method).tag_lambda(config.peft)
    return (
        f"{config.model.name}/{config.task.name}/{config.experiment.phase}/"
        f"lambda{lam:g}_rank{config.peft.rank}_seed{config.seed}"
    )


def add_file_logs(paths: list[Path], level: str) -> list[logging.Handler]:
    """Append the package's log records to each file in ``paths``."""
    handlers: list[logging.Handler] = []
    root = logging.getLogger("strato_peft")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.setLevel(level)
        root.addHandler(handler)
        handlers.append(handler)
    if root.level == logging.NOTSET or root.level > logging.getLevelName(level):
        root.setLevel(level)
    return handlers


def remove_handlers(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger("strato_peft")
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()


class Trackers:
    """TensorBoard and WandB behind one ``log(metrics, step)`` call (main process only)."""

    def __init__(self, config: ExperimentConfig, folder: Path, enabled: bool) -> None:
        self.tensorboard: Any = None
        self.wandb_run: Any = None
        if not enabled:
            return
        if config.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(log_dir=str(folder / TENSORBOARD_DIR))
            except ImportError:
                log.warning("TensorBoard is not installed (pip install tensorboard); skipping it")
        if config.logging.wandb:
            self.wandb_run = _start_wandb(config, folder)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)


def _start_wandb(config: ExperimentConfig, folder: Path) -> Any:
    try:
        import wandb
    except ImportError:
        log.warning(
            "wandb is not installed (pip install 'strato-peft[wandb]'); continuing without it"
        )
        return None
    mode = os.environ.get("WANDB_MODE")
    if not mode and not os.environ.get("WANDB_API_KEY"):
        mode = "offline"
        log.info("wandb: no WANDB_API_KEY, logging offline (upload later with 'wandb sync')")
    return wandb.init(
        project=config.logging.wandb_project,
        entity=config.logging.wandb_entity,
        name=run_tag(config),
        tags=[run_tag(config)],
        config=config.model_dump(mode="json", by_alias=True),
        dir=str(folder),
        mode=mode or "online",
        settings=wandb.Settings(silent=True),
    )


class EpochProfiler:
    """A 10-step ``torch.profiler`` window at the start of every epoch (``--profile``)."""

    ACTIVE = 10

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.profiler: Any = None
        self.remaining = 0

    def start_epoch(self, epoch: int) -> None:
        if self.folder is None:
            return
        import torch.profiler as tp

        self.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [tp.ProfilerActivity.CPU]
        import torch

        if torch.cuda.is_available():
            activities.append(tp.ProfilerActivity.CUDA)
        self.profiler = tp.profile(
            activities=activities,
            record_shapes=True,
            profile_memory=True,
            on_trace_ready=tp.tensorboard_trace_handler(
                str(self.folder), worker_name=f"epoch{epoch}"
            ),
        )
        self.profiler.__enter__()
        self.remaining = self.ACTIVE

    def step(self) -> None:
        if self.profiler is None:
            return
        self.remaining -= 1
        if self.remaining <= 0:
            self.stop()

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None
