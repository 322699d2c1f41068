"""The training loop: setup, train, evaluate, save, cleanup, for every method alike.

Built on ``accelerate`` (one process, or DDP under ``accelerate launch``). What one
optimizer step does (data order, AdamW, schedule, answer-token loss, clipping) is the
recipe of :mod:`strato_peft.recipe`, shared with STRATO's search evaluations; this
module adds the plan, checkpoints, evaluation, trackers and the progress bar. Methods act during training only through :meth:`Method.on_optimizer_step` and
:meth:`Method.regularization`; the loop never asks which method it runs. A method that
changes parameter shapes in the hook (the rank schedule) says so in the
:class:`StepContext`, and the loop rebuilds the DDP wrapper, whose gradient buckets are
bound to shapes.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from strato_peft.config.schema import ExperimentConfig
from strato_peft.encoding import encode_examples
from strato_peft.methods.base import StepContext
from strato_peft.methods.resize import module_ranks
from strato_peft.recipe import LocalAccelerator, StepRunner, TrainingRecipe, iterate_windows
from strato_peft.training.checkpoint import (
    TrainingState,
    load_checkpoint,
    readable_checkpoint,
    save_checkpoint,
)
from strato_peft.training.tracking import EpochProfiler, Trackers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPlan:
    """How many optimizer steps the run takes, derived from the data and the config."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(n_examples: int, config: ExperimentConfig, world_size: int = 1) -> TrainingPlan:
    """Optimizer steps: ``max_steps`` if set, else ``num_epochs`` x steps per epoch."""
    t = config.training
    micro = math.ceil(n_examples / (t.batch_size * world_size))
    per_epoch = math.ceil(micro / t.gradient_accumulation_steps)
    total = t.max_steps or math.ceil(t.num_epochs * per_epoch)
    return TrainingPlan(micro, per_epoch, total, int(t.warmup_ratio * total))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Trainer:
    """Trains a prepared PEFT model on encoded examples; see the module docstring."""

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        accelerator: Any,
        model: Any,
        method: Any,
        task: Any,
        tokenizer: Any,
        folder: Path,
        profile_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.method = method
        self.task = task
        self.tokenizer = tokenizer
        self.folder = folder
        self.recipe = TrainingRecipe.from_config(config)
        train = encode_examples(task, task.train_examples(), tokenizer, config.task.max_length)
        held_out = encode_examples(task, task.eval_examples(), tokenizer, config.task.max_length)
        self.held_out = held_out
        self.plan = make_plan(len(train), config, accelerator.num_processes)
        optimizer = self.recipe.optimizer([p for p in model.parameters() if p.requires_grad])
        self.scheduler = self.recipe.scheduler(optimizer, self.plan.total_steps)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
            model,
            optimizer,
            self.recipe.train_loader(train, tokenizer.pad_token_id),
            self.recipe.eval_loader(held_out, tokenizer.pad_token_id),
        )
        self.runner = StepRunner(
            self._compiled(self.model), self.optimizer, self.scheduler, self.recipe, accelerator,
            regularization=method.regularization,
        )  # fmt: skip
        self.state = TrainingState()
        self.trackers = Trackers(config, folder, enabled=accelerator.is_main_process)
        self.profiler = EpochProfiler(profile_dir if accelerator.is_main_process else None)
        self.train_seconds = 0.0
        self.adopted_tokens = 0
        self.measured_flops: dict[str, Any] = {}

    # -- checkpoints ----------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the newest checkpoint in the run folder, if there is one; else
        from the state the method offers (STRATO's search winner), written as one."""
        found = readable_checkpoint(self.folder)
        if found is None:
            initial = self.method.initial_state_path()
            if initial is None:
                return False
            if self.accelerator.is_main_process:
                from strato_peft.training.handoff import write_handoff_checkpoint

                model = self.accelerator.unwrap_model(self.model)
                write_handoff_checkpoint(
                    self.folder, model, initial, self.recipe, self.plan.total_steps
                )
            self.accelerator.wait_for_everyone()
            found = readable_checkpoint(self.folder)
            assert found is not None
            self.adopted_tokens = -1  # set below from the adopted state
        path, data = found
        model = self.accelerator.unwrap_model(self.model)
        ranks = module_ranks(model)
        self.state, method_state = load_checkpoint(
            path,
            model=model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            process_index=self.accelerator.process_index,
            data=data,
        )
        if module_ranks(model) != ranks:
            self._rewrap_model()
        self.method.load_state_dict(method_state)
        if self.adopted_tokens == -1:  # tokens trained by the search, not by this process
            self.adopted_tokens = self.state.tokens
        log.info(
            "resumed from %s (step %d of %d)", path.name, self.state.step, self.plan.total_steps
        )
        return True

    def save_checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(
                self.folder,
                model=self.accelerator.unwrap_model(self.model),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state=self.state,
                method_state=self.method.state_dict(),
            )
        self.accelerator.wait_for_everyone()

    # -- measurement -----------------------------------------------------------------------
    def count_step_flops(self) -> None:
        """FLOPs of one micro-batch forward+backward with FlopCounterMode (RNG untouched)."""
        from torch.utils.flop_counter import FlopCounterMode

        # Every process runs it (DDP's forward broadcasts buffers: one process alone would
        # hang); no_sync keeps the gradients local; fork_rng leaves the RNG as it was (a
        # DataLoader iterator draws a seed from it too), so training starts as it would
        # without this count.
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(self.train_loader))
        with (
            torch.random.fork_rng(devices=[]),
            self.accelerator.no_sync(self.model),
            FlopCounterMode(display=False) as counter,
        ):
            self.model.train()
            loss_sum, count = self.runner.loss_sum(batch)
            self.accelerator.backward(loss_sum / count.clamp(min=1))
        self.optimizer.zero_grad(set_to_none=True)
        flops = int(counter.get_total_flops())
        ga = self.config.training.gradient_accumulation_steps
        self.measured_flops = {
            "micro_batch_flops": flops,
            "micro_batch_shape": list(batch["input_ids"].shape),
            "train_flops_per_step": flops * ga * self.accelerator.num_processes,
            "counted_with": "torch.utils.flop_counter.FlopCounterMode (first micro-batch)",
        }

    # -- training --------------------------------------------------------------------------
    def _step(self, window: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """One optimizer step over ``window``; returns (mean answer-token loss, tokens).

        The method's hook runs after the optimizer step and before the gradients are
        zeroed; when it resized parameters, the DDP wrapper is rebuilt.
        """
        context = StepContext(optimizer=getattr(self.optimizer, "optimizer", self.optimizer))

        def hook() -> None:
            self.state.step += 1
            model = self.accelerator.unwrap_model(self.model)
            self.method.on_optimizer_step(model, self.state.step, context)

        loss, tokens = self.runner.step(window, on_step=hook)
        if context.resized:
            self._rewrap_model()
        return loss, tokens

    def _compiled(self, model: Any) -> Any:
        """``torch.compile`` of the (prepared) model with ``device_info.compile_model``.

        The compiled module shares its parameters with ``model``, which stays the one
        that checkpoints, FLOP counting and saving see. After a resize the rank schedule
        hands a new wrapper here, so it is compiled afresh.
        """
        if not self.config.device_info.compile_model:
            return model
        return torch.compile(model)

    def _rewrap_model(self) -> None:
        """Rebuild the DDP wrapper after parameter shapes changed (a no-op without DDP).

        The old wrapper's reducer holds the parameters' gradient accumulators, which carry
        the old shapes; it must be gone before the new wrapper takes fresh ones.
        """
        import gc

        from torch.nn.parallel import DistributedDataParallel as DDP

        old = self.model
        if not isinstance(old, DDP):
            self.runner.model = self._compiled(old)  # a compiled module re-traces new shapes
            if self.accelerator.num_processes > 1:
                raise RuntimeError(
                    "parameter shapes changed during training (peft.rank_schedule), which "
                    f"works with one process or DDP, not {self.accelerator.distributed_type}"
                )
            return
        module = old.module
        kwargs: dict[str, Any] = {
            "device_ids": old.device_ids,
            "output_device": old.output_device,
            "find_unused_parameters": old.find_unused_parameters,
            "bucket_cap_mb": old.bucket_bytes_cap / (1024 * 1024),
            "gradient_as_bucket_view": old.gradient_as_bucket_view,
            "static_graph": old.static_graph,
        }
        if not old.broadcast_buffers:
            kwargs["broadcast_buffers"] = False
        models = getattr(self.accelerator, "_models", [])
        index = next((i for i, m in enumerate(models) if m is old), None)
        self.model = self.runner.model = module
        del old
        if index is not None:
            models[index] = module
        gc.collect()
        self.model = DDP(module, **kwargs)
        if index is not None:
            models[index] = self.model
        self.runner.model = self._compiled(self.model)

    def evaluate_loss(self) -> float:
        """Mean answer-token loss on the held-out split (all processes)."""
        return self.runner.held_out_loss(self.eval_loader)

    def split_loss(self, examples: list[Any]) -> float:
        """Answer-token loss of ``examples`` (e.g. the search-validation split; main process)."""
        items = encode_examples(self.task, examples, self.tokenizer, self.config.task.max_length)
        model = self.accelerator.unwrap_model(self.model)
        # one process: no collective (the others do not take part)
        runner = StepRunner(model, None, None, self.recipe, LocalAccelerator.like(self.accelerator))
        return runner.held_out_loss(self.recipe.eval_loader(items, self.tokenizer.pad_token_id))

    def report_stats(self) -> dict[str, Any]:
        """The report split's loss and teacher-forced answer-token accuracy (points), each
        with a standard error and a bootstrap 95% interval over examples (main process)."""
        model = self.accelerator.unwrap_model(self.model)
        runner = StepRunner(model, None, None, self.recipe, LocalAccelerator.like(self.accelerator))
        loader = self.recipe.eval_loader(self.held_out, self.tokenizer.pad_token_id)
        return runner.held_out_stats(loader).summary()

    def train(self) -> None:
        """Run optimizer steps until the plan's total, with evaluation and checkpoints."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        t = self.config.training
        plan = self.plan
        columns = [
            TextColumn("[bold]train[/] step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
        ]
        progress = Progress(*columns, disable=not self.accelerator.is_main_process, transient=False)
        bar = progress.add_task(
            "train", total=plan.total_steps, completed=self.state.step, loss="-", tps="-"
        )
        self.model.train()
        windows = iterate_windows(self.train_loader, t.gradient_accumulation_steps, self.state)
        profiled_epoch: int | None = None
        with progress:
            while self.state.step < plan.total_steps:
                window = next(windows)
                if self.state.epoch != profiled_epoch:
                    profiled_epoch = self.state.epoch
                    self.profiler.start_epoch(profiled_epoch)
                start = time.perf_counter()
                loss, tokens = self._step(window)
                elapsed = time.perf_counter() - start
                self.profiler.step()
                self.train_seconds += elapsed
                self.state.tokens += tokens
                record: dict[str, Any] = {
                    "step": self.state.step,
                    "epoch": self.state.epoch,
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                }
                if t.eval_every_steps and self.state.step % t.eval_every_steps == 0:
                    record["eval_loss"] = self.evaluate_loss()
                self.state.history.append(record)
                self.trackers.log(
                    {f"train/{k}": v for k, v in record.items() if isinstance(v, float)},
                    self.state.step,
                )
                progress.update(
                    bar,
                    completed=self.state.step,
                    loss=f"{loss:.4f}",
                    tps=f"{record['tokens_per_s'] or 0:.0f}",
                )
                log.debug("step %d loss %.5f", self.state.step, loss)
                done = self.state.step >= plan.total_steps
                if done or (t.save_every_steps and self.state.step % t.save_every_steps == 0):
                    self.save_checkpoint()
        self.profiler.stop()

    def close(self, failed: bool = False) -> None:
        self.profiler.stop()
        self.trackers.close(failed=failed)
