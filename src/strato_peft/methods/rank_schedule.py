"""Dynamic rank scheduling: move LoRA rank between modules during training, under a budget.

After a warm-up, at configured optimizer steps, the scheduler ranks the modules by an
importance signal and moves ``rank_step`` rank from the ``move_fraction`` least important
modules to the most important ones, with real tensor resizing (:mod:`.resize`). The
*budget* is the trainable params of the initial allocation, ``sum_m r_m (d_in + d_out)``;
shrinks come before grows, so the total never exceeds it, not even mid-event. Per-token
adapter FLOPs, ``2 r (d_in + d_out)`` per module, are proportional to the same sum, so
the budget holds for them too. No change happens in the final freeze period.

Importance (``importance``):

- ``sensitivity`` (AdaLoRA, Zhang et al. 2023, arXiv:2303.10512): per rank component ``i``
  an exponential moving average of ``sum_j |A_ij dL/dA_ij| + sum_o |B_oi dL/dB_oi|``,
  updated after every optimizer step; a module scores the mean over its components.
- ``singular_values``: the mean singular value of the module's update ``s B A``.

Under DDP the gradients are already all-reduced, so every process would reach the same
decision; the decision is still made on process 0 and broadcast, and the resized tensors
and their optimizer moments are broadcast from process 0, so the processes cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from strato_peft.config.schema import RankScheduleSettings
from strato_peft.methods.resize import lora_layers, module_ranks, rank_cost, resize_model
from strato_peft.results import RANK_HISTORY_FILE, atomic_write_json


def resolve_step(value: int | float, total_steps: int) -> int:
    """A step count (int) or a fraction of ``total_steps`` (float in [0, 1))."""
    return round(value * total_steps) if isinstance(value, float) else int(value)


def schedule_steps(settings: RankScheduleSettings, total_steps: int) -> list[int]:
    """The optimizer steps at which rank is reallocated: after the warm-up, before the freeze."""
    warmup = resolve_step(settings.warmup, total_steps)
    last = total_steps - resolve_step(settings.final_freeze, total_steps)
    if settings.at_steps is not None:
        steps = {resolve_step(s, total_steps) for s in settings.at_steps}
    else:
        interval = max(1, resolve_step(settings.interval, total_steps))
        steps = set(range(warmup + interval, last + 1, interval))
    return sorted(s for s in steps if warmup < s <= last)


class RankScheduler:
    """Owns the importance statistics, the budget and the rank history of one run."""

    def __init__(
        self, settings: RankScheduleSettings, model: Any, total_steps: int, seed: int = 0
    ) -> None:
        self.settings = settings
        self.seed = seed
        layers = dict(lora_layers(model))
        if len(layers) < 2:
            raise ValueError(
                f"peft.rank_schedule needs >= 2 resizable LoRA modules, the model has {len(layers)}"
                " (AdaLoRA's layers are not resizable: it masks ranks itself)"
            )
        if settings.min_rank == 0 and any(
            layer.use_dora.get("default") for layer in layers.values()
        ):
            raise ValueError("peft.rank_schedule.min_rank must be >= 1 for DoRA")
        self.initial = module_ranks(model)
        self.unit_cost = {name: rank_cost(layer) for name, layer in layers.items()}
        self.budget = self.params(self.initial)
        self.max_rank = settings.max_rank or 2 * max(self.initial.values())
        self.steps = schedule_steps(settings, total_steps)
        self.importance = {
            name: torch.zeros(rank, dtype=torch.float64) for name, rank in self.initial.items()
        }
        self.history: dict[int, dict[str, int]] = {0: dict(self.initial)}

    def params(self, ranks: dict[str, int]) -> int:
        """Adapter params (``A`` and ``B``) of an allocation: ``sum r (d_in + d_out)``."""
        return sum(rank * self.unit_cost[name] for name, rank in ranks.items())

    # -- per step -------------------------------------------------------------------------
    def on_optimizer_step(self, model: Any, step: int, optimizer: Any) -> bool:
        """Update the importance; reallocate if ``step`` is a scheduled step. True if resized."""
        if self.settings.importance == "sensitivity":
            self._accumulate(model)
        if step not in self.steps:
            return False
        target = _broadcast(self.decide(model))
        if not target:
            return False
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        done = resize_model(model, target, optimizer=optimizer, generator=generator)
        _broadcast_tensors(model, [r.name for r in done], optimizer)
        for r in done:
            old = self.importance[r.name]
            if r.new_rank > r.old_rank:
                self.importance[r.name] = torch.cat([old, old.new_zeros(r.new_rank - r.old_rank)])
            else:  # components are re-factorised in SVD order: keep the largest statistics
                self.importance[r.name] = old.sort(descending=True).values[: r.new_rank].clone()
        self.history[step] = module_ranks(model)
        return bool(done)

    @torch.no_grad()
    def _accumulate(self, model: Any) -> None:
        beta = self.settings.ema_beta
        for name, layer in lora_layers(model):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if a.grad is None or b.grad is None or a.shape[0] == 0:
                continue
            score = (a * a.grad).abs().sum(1) + (b * b.grad).abs().sum(0)
            self.importance[name].mul_(beta).add_(score.double().cpu(), alpha=1 - beta)

    def scores(self, model: Any) -> dict[str, float]:
        """Importance per module (higher: more deserving of rank)."""
        if self.settings.importance == "sensitivity":
            return {
                name: float(vec.mean()) if vec.numel() else 0.0
                for name, vec in self.importance.items()
            }
        out = {}
        for name, layer in lora_layers(model):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if a.shape[0] == 0:
                out[name] = 0.0
                continue
            core = (
                torch.linalg.qr(b.detach().double())[1]
                @ torch.linalg.qr(a.detach().double().T)[1].T
            )
            out[name] = float(torch.linalg.svdvals(core).mean()) * layer.scaling["default"]
        return out

    def decide(self, model: Any) -> dict[str, int]:
        """New ranks of the modules that change (empty: no move this time)."""
        s = self.settings
        scores = self.scores(model)
        if not any(v > 0 for v in scores.values()):
            return {}
        current = module_ranks(model)
        order = sorted(current, key=lambda n: (scores[n], n))
        n_move = max(1, round(s.move_fraction * len(order)))
        new = dict(current)
        donors = [n for n in order if current[n] > s.min_rank][:n_move]
        for name in donors:
            new[name] = max(s.min_rank, current[name] - s.rank_step)
        spent = self.params(new)
        grew = False
        for name in reversed(order):
            if name in donors or current[name] >= self.max_rank:
                continue
            room = (self.budget - spent) // self.unit_cost[name]
            grow = min(s.rank_step, self.max_rank - current[name], room)
            if grow > 0:
                new[name] = current[name] + grow
                spent += grow * self.unit_cost[name]
                grew = True
        if not grew:
            return {}
        return {name: rank for name, rank in new.items() if rank != current[name]}

    # -- records --------------------------------------------------------------------------
    def write_history(self, folder: Path) -> Path:
        """``rank_history.json``: step -> module -> rank (the initial ranks at step 0)."""
        path = folder / RANK_HISTORY_FILE
        atomic_write_json(path, {str(k): v for k, v in sorted(self.history.items())})
        return path

    def summary(self) -> dict[str, Any]:
        final = self.history[max(self.history)]
        changes = [
            (prev[name], now[name])
            for (_, prev), (_, now) in zip(
                sorted(self.history.items()), sorted(self.history.items())[1:], strict=False
            )
            for name in now
            if now[name] != prev[name]
        ]
        return {
            "budget_params": self.budget,
            "final_params": self.params(final),
            "events": len(self.history) - 1,
            "grows": sum(new > old for old, new in changes),
            "shrinks": sum(new < old for old, new in changes),
            "steps": self.steps,
            "final_ranks": final,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "importance": {k: v.clone() for k, v in self.importance.items()},
            "history": {k: dict(v) for k, v in self.history.items()},
            "initial": dict(self.initial),
            "budget": self.budget,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = {k: v.clone() for k, v in state["importance"].items()}
        self.history = {int(k): dict(v) for k, v in state["history"].items()}
        self.initial = dict(state.get("initial", self.initial))
        self.budget = int(state.get("budget", self.budget))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _broadcast(obj: dict[str, int]) -> dict[str, int]:
    """Process 0's decision on every process."""
    if not _distributed():
        return obj
    box: list[Any] = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    result: dict[str, int] = box[0]
    return result


def _broadcast_tensors(model: Any, names: list[str], optimizer: Any) -> None:
    """Process 0's resized factors and moments on every process."""
    if not _distributed() or not names:
        return
    layers = dict(lora_layers(model))
    for name in names:
        for param in (layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight):
            tensors = [param.data]
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]
            for tensor in tensors:
                if tensor.numel():
                    torch.distributed.broadcast(tensor, src=0)
