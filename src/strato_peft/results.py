"""Run folders: naming, atomic writes, and what every run records about itself.

A run lives in ``<output.dir>/<model>/<task>/<method>_rank<r>[_lambda<l>]_seed<s>/``
(the product spec's naming). Files are written to a temporary name and renamed, so a
crash never leaves a file that looks complete.
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
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from strato_peft.config.loader import resolved_yaml
from strato_peft.config.schema import ExperimentConfig

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
TRACKED_PACKAGES = (
    "strato-peft",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "pydantic",
    "numpy",
)


def _fmt(value: float) -> str:
    return f"{value:g}"


def run_name(config: ExperimentConfig) -> str:
    """``<method>_rank<r>[_lambda<l>]_seed<s>``; lambda only for STRATO, whose controls
    are named ``strato-uniform`` / ``strato-random``."""
    p = config.peft
    name = f"{p.method}_rank{p.rank}"
    if p.method == "strato":
        name += f"_lambda{_fmt(p.strato.lambda_)}"
        if p.strato.control != "none":
            name = f"{p.method}-{p.strato.control}_rank{p.rank}"
    return f"{name}_seed{config.seed}"


def run_dir(config: ExperimentConfig) -> Path:
    """The run folder of ``config``."""
    return Path(config.output.dir) / config.model.name / config.task.name / run_name(config)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; when the block succeeds it replaces
    ``target`` (a rename), when it fails it is removed: never half a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON variant of :func:`atomic_write_text` (indented, sorted keys)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


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
