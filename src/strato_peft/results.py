"""Run folders: every file name, naming, JSON and status reading, and atomic writes.

A run lives in ``<output.dir>/<model>/<task>/<label>_seed<s>/``, the label being the
method's own (:meth:`strato_peft.methods.Method.run_label`: ``<method>_rank<r>`` for the
baselines, ``strato_rank<r>_lambda<l>`` for STRATO). This module is the one place that
spells the folder's file names; every other module uses the constants below. Files are
written to a temporary name and renamed, with one permission policy (what the umask
allows, as for any file the user creates), so a crash never leaves a file that looks
complete and every run file has the same mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as stdlib_platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from strato_peft.config.loader import resolved_yaml
from strato_peft.config.schema import ExperimentConfig

# -- the run folder's files (the only place they are spelled) ---------------------------
CONFIG_FILE = "config.yaml"
"""The resolved config: ``--config`` on it repeats the run."""
ENV_FILE = "env.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
COSTS_FILE = "costs.json"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""peft's ``save_pretrained`` config, inside :data:`ADAPTER_DIR`."""
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_STATE_FILE = "state.pt"
"""Inside each ``checkpoints/step_<N>/``."""
TRAINING_LOG = "training.log"
TENSORBOARD_DIR = "tensorboard"
RANK_HISTORY_FILE = "rank_history.json"
ALLOCATION_FILE = "allocation.json"
SEARCH_FILE = "search.json"
PARETO_FILE = "pareto.json"
PARETO_PLOT = "pareto.png"
ARCHIVE_FILE = "archive.sqlite"
SEARCH_STATES_DIR = "search_states"
"""Each candidate's training state after each rung (``<hash>@<steps>.pt``)."""
COMPLETE_OUTPUTS = (METRICS_FILE, COSTS_FILE, ADAPTER_DIR)
"""Written only when a run completes; removed when a run starts afresh."""

RUNNING, COMPLETE, FAILED = "running", "complete", "failed"

TRACKED_PACKAGES = (
    "strato-peft",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "pydantic",
    "numpy",
)


def eval_file(task: str) -> str:
    """``eval_<task>.json``: metrics of ``strato-peft eval`` on a run's adapter."""
    return f"eval_{task}.json"


def predictions_file(task: str) -> str:
    """``predictions_<task>.jsonl``: the per-item outputs of ``strato-peft eval``."""
    return f"predictions_{task}.jsonl"


class RunFileError(ValueError):
    """A run-folder file is missing, unreadable or of the wrong shape (the message says which)."""


def read_json(path: Path) -> Any:
    """The JSON in ``path``; :class:`RunFileError` naming the file when it is missing or bad."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFileError(f"{Path(path).name} is missing") from None
    except (OSError, ValueError) as exc:
        raise RunFileError(
            f"{Path(path).name} is unreadable ({exc.__class__.__name__}: {exc})"
        ) from None


def read_json_object(path: Path) -> dict[str, Any]:
    """:func:`read_json` for files that hold one JSON object."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunFileError(f"{Path(path).name} is not a JSON object")
    return data


def read_json_or(path: Path, default: Any) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing or unreadable (optional files)."""
    try:
        return read_json(path)
    except RunFileError:
        return default


def read_status(folder: Path) -> dict[str, Any]:
    """``status.json`` of a run folder (``{}`` when there is none or it is unreadable)."""
    data = read_json_or(Path(folder) / STATUS_FILE, {})
    return data if isinstance(data, dict) else {}


def write_status(folder: Path, status: str, **extra: Any) -> None:
    """Set a run's status (``running``, ``complete`` or ``failed``), keeping ``started_at``."""
    previous = read_status(folder)
    data = {"status": status, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    data["started_at"] = (
        previous.get("started_at", data["updated_at"]) if status != RUNNING else data["updated_at"]
    )
    atomic_write_json(Path(folder) / STATUS_FILE, data)


FAST_DEV_SUFFIX = "_fast-dev-run"
"""A ``--fast-dev-run`` writes ``<label>_seed<s>_fast-dev-run``: never the real run's
folder, and never read as a result (the analysis skips it)."""

IDENTITY_SECTIONS = ("seed", "model", "task", "peft", "training")
"""The parts of a resolved config that change what a run trains or reports."""
IDENTITY_EXEMPT = ("training.save_every_steps", "training.eval_every_steps")
"""Keys that change when checkpoints and evaluations happen, not what is trained."""


def _segment(value: str, key: str) -> str:
    """``value`` as one folder name, or :class:`RunFileError` naming ``key``."""
    bad = (
        not value
        or value in (".", "..")
        or any(c in value for c in "/\\\0")
        or value != value.strip()
        or Path(value).is_absolute()
    )
    if bad:
        raise RunFileError(
            f"{key}={value!r} cannot name a run folder: it must be one folder name (no '/', "
            "'\\', '..' or surrounding spaces), so that the run stays inside output.dir"
        )
    return value


def run_dir(config: ExperimentConfig, label: str, fast_dev_run: bool = False) -> Path:
    """The run folder of ``config``: ``<output.dir>/<model>/<task>/<label>_seed<s>``
    (``..._fast-dev-run`` for a fast dev run). Every part below ``output.dir`` must be one
    folder name, so a run never writes outside ``output.dir``.

    ``label`` is the method's :meth:`~strato_peft.methods.Method.run_label` (the method
    owns its naming; :func:`strato_peft.methods.run_folder` puts the two together).
    """
    name = f"{_segment(label, 'the run label')}_seed{config.seed}"
    if fast_dev_run:
        name += FAST_DEV_SUFFIX
    model = _segment(config.model.name, "model.name")
    task = _segment(config.task.name, "task.name")
    return Path(config.output.dir) / model / task / name


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(folder: Path, config: ExperimentConfig) -> list[str]:
    """The keys in which ``config`` differs from the one ``folder`` ran with (its
    ``config.yaml``), within :data:`IDENTITY_SECTIONS` less :data:`IDENTITY_EXEMPT`;
    ``[]`` when the folder has no config. An unreadable config is a difference."""
    import yaml

    path = folder / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return [f"{CONFIG_FILE} (unreadable)"]
    if not isinstance(saved, dict):
        return [f"{CONFIG_FILE} (not a mapping)"]
    current = config.model_dump(mode="json", by_alias=True)
    pick = lambda tree: _flatten({k: tree.get(k) for k in IDENTITY_SECTIONS})  # noqa: E731
    mine, theirs = pick(current), pick(saved)
    keys = sorted(set(mine) | set(theirs))
    return [k for k in keys if k not in IDENTITY_EXEMPT and mine.get(k) != theirs.get(k)]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: str | Path, directory: bool = False) -> None:
    """The one permission policy: what the umask allows (mkstemp/mkdtemp give 0600/0700,
    which would hide results from the other users of a shared results folder)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text writes str, not {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON variant of :func:`atomic_write_text` (indented, sorted keys)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; when the block succeeds it replaces
    ``target`` (a rename), when it fails it is removed: never half a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        _publish(tmp, directory=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove(path: Path) -> None:
    """Delete a run file or folder if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def save_resolved_config(config: ExperimentConfig, folder: Path) -> Path:
    """Write the resolved config into ``folder``; ``--config`` on it repeats the run."""
    path = folder / CONFIG_FILE
    atomic_write_text(path, resolved_yaml(config))
    return path


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def environment_info(seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Package versions, git commit, hardware, seed and command line of this process."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "seed": seed,
        "command": sys.argv,
        "python": sys.version.split()[0],
        "packages": versions,
        "git_commit": _git_commit() or os.environ.get("STRATO_PEFT_GIT_COMMIT"),
        "hardware": {
            "machine": stdlib_platform.machine(),
            "processor": stdlib_platform.processor(),
            "system": stdlib_platform.platform(),
            "cpu_count": os.cpu_count(),
        },
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["hardware"]["gpus"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    info.update(extra or {})
    return info
