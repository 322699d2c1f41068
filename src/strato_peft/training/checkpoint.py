"""Checkpoints of a run: adapter, optimizer, scheduler, RNG states and position.

Only the trainable (adapter) tensors are saved, with the rank of every LoRA module, so
that a run whose ranks changed during training (``peft.rank_schedule``) is resized to them
*before* tensors and optimizer state are loaded; the frozen base model is not saved, so a
checkpoint of a 7B run is megabytes. A checkpoint is written to a temporary folder and
renamed, so a kill during the write never leaves a checkpoint that looks complete; the
newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strato_peft.methods.resize import module_ranks, resize_model
from strato_peft.recipe import DataPosition
from strato_peft.results import CHECKPOINT_STATE_FILE as STATE_FILE
from strato_peft.results import CHECKPOINTS_DIR as CHECKPOINTS
from strato_peft.results import atomic_directory


@dataclass
class TrainingState(DataPosition):
    """Where training stands: what a resume needs beyond tensors (the data position:
    ``epoch`` and the micro-batches of it already consumed, and the counters below)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # answer tokens trained on
    history: list[dict[str, Any]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``model`` (the adapter), on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainingState,
    method_state: dict[str, Any],
    process_index: int = 0,
    keep: int = 2,
) -> Path:
    """Write ``folder/checkpoints/step_<N>`` atomically; returns its path."""
    root = folder / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:08d}"
    with atomic_directory(final) as tmp:
        torch.save(
            {
                "adapter": trainable_state(model),
                "ranks": module_ranks(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "training": state.__dict__,
                "method": method_state,
                "rng": {process_index: rng_state()},
            },
            tmp / STATE_FILE,
        )
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, if any."""
    found = sorted(p for p in (folder / CHECKPOINTS).glob("step_*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    process_index: int = 0,
) -> tuple[TrainingState, dict[str, Any]]:
    """Restore tensors, optimizer, scheduler and RNG; returns the state and method state."""
    try:
        data = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt file is reported, not a traceback
        raise ValueError(f"checkpoint {path / STATE_FILE} cannot be read: {exc}") from None
    ranks = data.get("ranks") or {}
    if ranks and ranks != module_ranks(model):
        try:
            resize_model(model, ranks)
        except ValueError as exc:
            raise ValueError(f"checkpoint {path} does not fit this model: {exc}") from None
    params = dict(model.named_parameters())
    missing = [name for name in data["adapter"] if name not in params]
    if missing:
        raise ValueError(
            f"checkpoint {path} does not fit this model: {len(missing)} tensors unknown "
            f"(first: {missing[0]}); was the config changed?"
        )
    with torch.no_grad():
        for name, tensor in data["adapter"].items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, the model "
                    f"{tuple(params[name].shape)}; was the config changed?"
                )
            params[name].copy_(tensor)
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    rng = data["rng"].get(process_index) or next(iter(data["rng"].values()))
    set_rng_state(rng)
    return TrainingState(**data["training"]), data["method"]
