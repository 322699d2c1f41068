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
from pathlib import Path
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


@dataclass
class CandidateState:
    """Where a candidate's training stands after a rung: enough to resume it exactly."""

    steps: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int
    batches_in_epoch: int
    rng: torch.Tensor
    train_losses: list[float]
    tokens: int
    cuda_rng: torch.Tensor | None = None
    """The CUDA generator of the device (dropout on a GPU), when the device is one."""

    def save(self, path: Path) -> None:
        """Tensors and plain values only (``torch.load(weights_only=True)`` reads it back)."""
        import io

        from strato_peft.results import atomic_write_bytes

        buffer = io.BytesIO()
        torch.save(self.__dict__, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> CandidateState:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(**data)
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"candidate state {path} cannot be read: {exc}") from None


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
        schedule_steps: int | None = None,
    ) -> None:
        self.base = base
        self.steps = steps
        self.schedule_steps = schedule_steps or steps
        """Horizon of the learning-rate schedule: the run's total steps for candidates that
        may continue into the final training (a rung is then a prefix of that training)."""
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
        if getattr(self.base, "hf_device_map", None):  # placed by device_map: leave it there
            return model
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

    def train(
        self, allocation: Mapping[str, int], steps: int, state: CandidateState | None = None
    ) -> tuple[EvaluationResult, CandidateState]:
        """Train ``allocation`` to ``steps`` optimizer steps (from ``state`` when given) on
        the schedule of :attr:`schedule_steps`; its held-out loss and its state."""
        start = time.perf_counter()
        with torch.random.fork_rng(devices=_rng_devices(self.device)):
            model = self.build(allocation)
            params = dict(model.named_parameters())
            optimizer = self.recipe.optimizer([p for p in params.values() if p.requires_grad])
            scheduler = self.recipe.scheduler(optimizer, self.schedule_steps)
            position, losses, tokens, done = DataPosition(), [], 0, 0
            if state is None:
                torch.manual_seed(self.recipe.seed)
            else:
                with torch.no_grad():
                    for name, tensor in state.adapter.items():
                        params[name].copy_(tensor)
                optimizer.load_state_dict(state.optimizer)
                scheduler.load_state_dict(state.scheduler)
                position = DataPosition(state.epoch, state.batches_in_epoch)
                torch.set_rng_state(state.rng)
                if state.cuda_rng is not None and self.device.type == "cuda":
                    torch.cuda.set_rng_state(state.cuda_rng, self.device)
                losses, tokens, done = list(state.train_losses), state.tokens, state.steps
            runner = self.runner(model, optimizer, scheduler)
            model.train()
            windows = iterate_windows(
                self.train_loader, self.recipe.gradient_accumulation_steps, position
            )
            for _ in range(steps - done):
                loss, n = runner.step(next(windows))
                losses.append(loss)
                tokens += n
            new_state = CandidateState(
                steps=steps,
                adapter={n: p.detach().cpu().clone() for n, p in params.items() if p.requires_grad},
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                epoch=position.epoch,
                batches_in_epoch=position.batches_in_epoch,
                rng=torch.get_rng_state(),
                train_losses=losses,
                tokens=tokens,
                cuda_rng=torch.cuda.get_rng_state(self.device)
                if self.device.type == "cuda"
                else None,
            )
            eval_loss = runner.held_out_loss(self.eval_loader)
        del model, optimizer, runner
        return EvaluationResult(eval_loss, time.perf_counter() - start, losses), new_state


def _rng_devices(device: torch.device) -> list[Any]:
    return [device] if device.type == "cuda" else []


def probe_sensitivity(
    evaluator: RealEvaluator, slots: list[Slot], batches: int, rank: int = 8, seed: int = 0
) -> list[float]:
    """Per-slot sensitivity per parameter: ``|dL/dB|^2 / (d_in + d_out)`` of a temporary
    LoRA at initialisation (``B = 0``), dropout off.

    With ``B = 0`` the adapter does not change the model yet; the gradient of ``B`` is
    the first-order gain of opening that slot, measured on ``batches`` training batches
    (the evaluator's fixed order, from batch ``seed x batches`` on, so two seeds see
    different batches and their agreement measures the ranking's stability). Dividing by
    the slot's parameters per rank prices the gain per parameter, as the budget does.
    Returned in slot order, normalised to mean 1.
    """
    allocation = {s.name: rank for s in slots}
    with torch.random.fork_rng(devices=_rng_devices(evaluator.device)):
        torch.manual_seed(evaluator.recipe.seed + seed)
        model = evaluator.build(allocation)
    runner = evaluator.runner(model)
    model.eval()  # dropout off: the gradient of the model the adapter starts from
    set_epoch(evaluator.train_loader, 0)
    first = seed * batches
    for batch in itertools.islice(evaluator.train_loader, first, first + batches):
        loss_sum, count = runner.loss_sum(batch)
        (loss_sum / count.clamp(min=1)).backward()
    norms: dict[str, float] = {}
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if lora_b is None or "default" not in lora_b:
            continue
        grad = lora_b["default"].weight.grad
        key = name.split("base_model.model.", 1)[-1]
        norms[key] = float(grad.pow(2).sum()) if grad is not None else 0.0
    missing = [s.name for s in slots if s.name not in norms]
    if missing:
        raise RuntimeError(f"sensitivity probe found no adapter for {missing[:3]}")
    values = [norms[s.name] / (s.d_in + s.d_out) for s in slots]
    mean = sum(values) / len(values) or 1.0
    del model
    return [v / mean for v in values]
