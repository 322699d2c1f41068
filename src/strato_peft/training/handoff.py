"""The search winner continues into the final training: its state as the run's checkpoint.

A structured search trains each candidate on the run's own schedule (over the run's
total steps), so the winner after ``k`` steps is exactly where its final training would
be after ``k`` steps. When a run has no checkpoint yet and its method offers such a
state (:meth:`Method.initial_state_path`), the trainer writes the winner's adapter,
optimizer, scheduler, data position and RNG as ``checkpoints/step_<k>`` and resumes it
like any interrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from strato_peft.recipe import TrainingRecipe
from strato_peft.strato.evaluator import CandidateState
from strato_peft.training.checkpoint import TrainingState, save_checkpoint


def write_handoff_checkpoint(
    folder: Path, model: Any, state_path: Path, recipe: TrainingRecipe, total_steps: int
) -> int:
    """Load the winner's state into ``model`` and save it as the run's checkpoint; the
    step it resumes from. The peft model's trainable tensors must match the state's."""
    state = CandidateState.load(state_path)
    params = dict(model.named_parameters())
    missing = [n for n in state.adapter if n not in params]
    if missing:
        raise ValueError(f"the search winner's state does not fit the model ({missing[0]})")
    with torch.no_grad():
        for name, tensor in state.adapter.items():
            params[name].copy_(tensor)
    optimizer = recipe.optimizer([p for p in model.parameters() if p.requires_grad])
    optimizer.load_state_dict(state.optimizer)
    scheduler = recipe.scheduler(optimizer, total_steps)
    scheduler.load_state_dict(state.scheduler)
    history = [
        {"step": i + 1, "loss": loss, "search": True} for i, loss in enumerate(state.train_losses)
    ]
    training = TrainingState(
        epoch=state.epoch,
        batches_in_epoch=state.batches_in_epoch,
        step=state.steps,
        tokens=state.tokens,
        history=history,
    )
    cuda_rng = state.cuda_rng if torch.cuda.is_available() else None
    with torch.random.fork_rng(
        devices=[torch.cuda.current_device()] if cuda_rng is not None else []
    ):
        torch.set_rng_state(state.rng)  # the checkpoint records the winner's RNG
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
        save_checkpoint(
            folder, model=model, optimizer=optimizer, scheduler=scheduler, state=training,
            method_state={},
        )  # fmt: skip
    return state.steps
