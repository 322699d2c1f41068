"""Real evaluations: a short fine-tune of one allocation, then the held-out loss.

An evaluation trains with the run's own recipe (:mod:`strato_peft.recipe`: data order,
AdamW, schedule, answer-token loss, clipping) and the run's own LoRA settings
(:class:`~strato_peft.adapters.LoraBuilder`), so it measures the model the final
training would train: the same allocation, data and steps give the same per-step
losses as a run (tested). Every allocation starts from the same base model, sees the
same batches in the same order and gets the same initialisation seed (common random
numbers): differences between two evaluations come from the allocations.

It runs in one process (:class:`~strato_peft.recipe.LocalAccelerator`): under DDP the
search runs on the main process while the others wait. Each evaluation trains a deep
copy of the base model, which stays untouched.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from strato_peft.adapters import LoraBuilder
from strato_peft.costs import Slot
from strato_peft.encoding import Encoded
from strato_peft.recipe import (
    DataPosition,
    LocalAccelerator,
    StepRunner,
    TrainingRecipe,
    iterate_windows,
    set_epoch,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    """What one real evaluation measured."""

    eval_loss: float
    wall_time_s: float
    train_losses: list[float] = field(default_factory=list)
    """Mean answer-token loss of every optimizer step."""


class RealEvaluator:
    """Short fine-tunes of allocations on a fixed base model (see the module docstring)."""

    def __init__(
        self,
        base: torch.nn.Module,
        train: list[Encoded],
        held_out: list[Encoded],
        *,
        steps: int,
        recipe: TrainingRecipe,
        builder: LoraBuilder,
        accelerator: LocalAccelerator,
        pad_token_id: int,
    ) -> None:
        self.base = base
        self.steps = steps
        self.recipe = recipe
        self.builder = builder
        self.accelerator = accelerator
        self.device = accelerator.device
        self.train_loader = recipe.train_loader(train, pad_token_id)
        self.eval_loader = recipe.eval_loader(held_out, pad_token_id)

    def build(self, allocation: Mapping[str, int]) -> Any:
        """A fresh peft model of ``allocation`` on a copy of the base (seeded initialisation)."""
        model = self.builder.build(
            copy.deepcopy(self.base), self.builder.for_allocation(allocation)
        )
        return model.to(self.device)

    def runner(self, model: Any, optimizer: Any = None, scheduler: Any = None) -> StepRunner:
        return StepRunner(model, optimizer, scheduler, self.recipe, self.accelerator)

    def held_out_loss(self, model: torch.nn.Module) -> float:
        return self.runner(model).held_out_loss(self.eval_loader)

    def base_loss(self) -> float:
        """Held-out loss of the base model (the empty allocation: score 0)."""
        return self.held_out_loss(self.base)

    def evaluate(self, allocation: Mapping[str, int]) -> EvaluationResult:
        """Fine-tune ``allocation`` for the configured steps, then its held-out loss."""
        if not allocation:
            return EvaluationResult(self.base_loss(), 0.0)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            model = self.build(allocation)
            torch.manual_seed(self.recipe.seed)  # dropout's stream, as a run after its build
            optimizer = self.recipe.optimizer([p for p in model.parameters() if p.requires_grad])
            runner = self.runner(model, optimizer, self.recipe.scheduler(optimizer, self.steps))
            model.train()
            windows = iterate_windows(
                self.train_loader, self.recipe.gradient_accumulation_steps, DataPosition()
            )
            losses = [runner.step(next(windows))[0] for _ in range(self.steps)]
            loss = runner.held_out_loss(self.eval_loader)
        del model, optimizer, runner
        return EvaluationResult(loss, time.perf_counter() - start, losses)


def _rng_devices(device: torch.device) -> list[Any]:
    return [device] if device.type == "cuda" else []


def probe_sensitivity(
    evaluator: RealEvaluator, slots: list[Slot], batches: int, rank: int = 8
) -> list[float]:
    """Per-slot sensitivity: |dL/dB| of a temporary LoRA at initialisation (B = 0).

    With ``B = 0`` the adapter does not change the model yet; the gradient of ``B`` is
    the first-order gain of opening that slot, measured on the task's training batches
    (the first ``batches`` of the evaluator's fixed order). Returned in slot order,
    normalised to mean 1.
    """
    allocation = {s.name: rank for s in slots}
    model = evaluator.build(allocation)
    runner = evaluator.runner(model)
    model.train()
    set_epoch(evaluator.train_loader, 0)
    for batch in itertools.islice(evaluator.train_loader, batches):
        loss_sum, count = runner.loss_sum(batch)
        (loss_sum / count.clamp(min=1)).backward()
    norms: dict[str, float] = {}
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if lora_b is None or "default" not in lora_b:
            continue
        grad = lora_b["default"].weight.grad
        key = name.split("base_model.model.", 1)[-1]
        norms[key] = float(grad.norm()) if grad is not None else 0.0
    missing = [s.name for s in slots if s.name not in norms]
    if missing:
        raise RuntimeError(f"sensitivity probe found no adapter for {missing[:3]}")
    values = [norms[s.name] for s in slots]
    mean = sum(values) / len(values) or 1.0
    del model
    return [v / mean for v in values]
