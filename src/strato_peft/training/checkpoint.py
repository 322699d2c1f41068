"""Checkpoints of a run: adapter, optimizer, scheduler, RNG states and position.

Only the trainable (adapter) tensors are saved, with the rank of every LoRA module, so
that a run whose ranks changed during training (``peft.rank_schedule``) is resized to them
*before* tensors and optimizer state are loaded; the frozen base model is not saved, so a
checkpoint of a 7B run is megabytes. A checkpoint is written to a temporary folder and
renamed, so a kill during the write never leaves a checkpoint that looks complete; the
newest ``keep`` checkpoints are kept.

No code runs from a checkpoint: the state file holds tensors and plain values only
(numbers, strings, lists, dicts; the RNG states are converted to those) and is read
with ``torch.load(weights_only=True)``, whose unpickler refuses every global outside
torch's allow-list, so a pickle with a ``__reduce__`` that calls ``os.system`` raises
instead of running. Checkpoints written before this format hold numpy's RNG state as
an array; the three numpy globals that rebuild an array are allow-listed for them
(:data:`LEGACY_GLOBALS`), nothing else. Content is validated before anything is
restored, and a run resumes from the newest *readable* checkpoint, reporting the
newer unreadable ones (:func:`readable_checkpoint`).
"""

from __future__ import annotations

import logging
import pickle
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

log = logging.getLogger(__name__)

LEGACY_GLOBALS: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
"""What rebuilds numpy's RNG key array in checkpoints of the earlier format (with
numpy's ``_reconstruct``, added below): array, dtype and the uint32 dtype class."""
try:  # numpy >= 2 pickles ``numpy._core``, older ones ``numpy.core``
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
LEGACY_GLOBALS.append(_reconstruct)

SECTIONS = ("adapter", "ranks", "optimizer", "scheduler", "training", "method", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not hold a checkpoint's content."""


@dataclass
class TrainingState(DataPosition):
    """Where training stands: what a resume needs beyond tensors (the data position:
    ``epoch`` and the micro-batches of it already consumed, and the counters below)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # answer tokens trained on
    history: list[dict[str, Any]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) generators as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved: Any) -> Any:
    if isinstance(saved, dict):  # this format
        keys = saved["keys"].numpy().astype(np.uint32)
        return (saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
    return saved  # the earlier format: numpy's own tuple


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(_numpy_state(state["numpy"]))
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


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    return sorted(p for p in (folder / CHECKPOINTS).glob("step_*") if (p / STATE_FILE).is_file())


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, if any (readable or not)."""
    found = checkpoints(folder)
    return found[-1] if found else None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The validated content of checkpoint ``path`` (a ``step_<N>`` folder); no code from
    it runs (module docstring). :class:`CheckpointError` names the file and what is wrong."""
    file = path / STATE_FILE
    try:
        with torch.serialization.safe_globals(LEGACY_GLOBALS):
            data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {file} holds objects other than tensors and plain values, so it is "
            f"not loaded (no code runs from a checkpoint): {first[:200]}"
        ) from None
    except Exception as exc:  # truncated, bit-flipped, not a torch file
        raise CheckpointError(
            f"checkpoint {file} cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {file} is a {type(data).__name__}, not a mapping")
    missing = [k for k in SECTIONS if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {file} lacks {', '.join(missing)}")
    wrong = [f"{k} is a {type(data[k]).__name__}" for k in SECTIONS
             if not isinstance(data[k], dict)]  # fmt: skip
    if wrong:  # every section is a mapping; the checks below read into them
        raise CheckpointError(f"checkpoint {file}: {'; '.join(wrong)}")
    bad = [n for n, t in data["adapter"].items() if not isinstance(t, torch.Tensor)]
    if bad:
        wrong.append(f"adapter entry {bad[0]!r} is not a tensor")
    if not data["rng"]:
        wrong.append("rng is empty")
    unknown = set(data["training"]) - set(TrainingState.__dataclass_fields__)
    if unknown:
        wrong.append(f"training has unknown fields {sorted(unknown)[:3]}")
    if wrong:
        raise CheckpointError(f"checkpoint {file}: {'; '.join(wrong)}")
    return data


def readable_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads and validates, with its content; every newer one
    that does not is reported (a warning naming it and why) and skipped. ``None`` when
    there is no checkpoint; :class:`CheckpointError` when none of them reads."""
    found = checkpoints(folder)
    errors = []
    for path in reversed(found):
        try:
            data = read_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        if errors:
            log.warning("resuming from %s, the newest intact checkpoint", path.name)
        return path, data
    if errors:
        raise CheckpointError(
            f"no checkpoint of {folder} can be read ({len(errors)}): {errors[0]}; delete "
            f"{folder / CHECKPOINTS} to start again"
        )
    return None


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    process_index: int = 0,
    data: dict[str, Any] | None = None,
) -> tuple[TrainingState, dict[str, Any]]:
    """Restore tensors, optimizer, scheduler and RNG; returns the state and method state.
    ``data``: the content :func:`read_checkpoint` returned (read here when not given)."""
    data = data if data is not None else read_checkpoint(path)
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
    try:
        optimizer.load_state_dict(data["optimizer"])
        scheduler.load_state_dict(data["scheduler"])
        rng = data["rng"].get(process_index) or next(iter(data["rng"].values()))
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise CheckpointError(
            f"checkpoint {path / STATE_FILE}: optimizer, scheduler or RNG state does not "
            f"restore ({type(exc).__name__}: {str(exc)[:200]}); was the config changed?"
        ) from None
    return TrainingState(**data["training"]), data["method"]
