"""Batch runner: every experiment config of a folder x seeds, resumable by construction.

Each (config, seed) is one ``python -m strato_peft.cli --config X --seed S`` subprocess,
so a crash or out-of-memory in one run cannot take the batch down. A run whose folder
says ``complete`` is skipped; a failed run is retried once (a killed run resumes from
its newest checkpoint, see ``strato_peft.training.run``) and then reported. Killing
the batch and starting it again therefore continues where it stopped.
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SEEDS = (42, 43, 44)

SKIPPED = "skipped (complete)"
DONE = "complete"
RETRIED = "complete (after retry)"
FAILED = "failed"
WOULD_RUN = "would run"
INVALID = "invalid config"


@dataclass
class Job:
    config: Path
    seed: int
    run_dir: Path | None
    status: str = "pending"
    attempts: int = 0
    seconds: float = 0.0
    error: str = ""
    command: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.config.stem} seed {self.seed}"


Runner = Callable[[list[str]], int]


def subprocess_runner(command: list[str]) -> int:
    """Run one training command; its output goes straight to this terminal."""
    return subprocess.run(command, check=False).returncode


def find_configs(config_dir: Path, patterns: list[str] | None = None) -> list[Path]:
    """Experiment YAMLs in ``config_dir`` (not recursive) whose stem matches any of ``patterns``.

    A pattern is a shell glob (``p1_*``) or, without glob characters, a substring.
    """
    configs = sorted(p for p in Path(config_dir).glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
    if not patterns:
        return configs

    def matches(path: Path) -> bool:
        return any(
            fnmatch.fnmatch(path.stem, p) or fnmatch.fnmatch(path.name, p)
            if any(ch in p for ch in "*?[")
            else p in path.stem
            for p in patterns
        )

    return [p for p in configs if matches(p)]


def plan_jobs(configs: list[Path], seeds: tuple[int, ...], overrides: list[str]) -> list[Job]:
    """One job per (config, seed), with its run folder (``None`` when the config is invalid)."""
    from strato_peft.config import load_config
    from strato_peft.config.loader import ConfigError
    from strato_peft.methods import run_folder
    from strato_peft.results import COMPLETE, read_status

    jobs = []
    for config in configs:
        for seed in seeds:
            command = [
                sys.executable,
                "-m",
                "strato_peft.cli",
                "--config",
                str(config),
                "--seed",
                str(seed),
            ]
            for override in overrides:
                command += ["--override", override]
            try:
                folder = run_folder(load_config(config, overrides, seed=seed))
            except (ConfigError, ValueError) as exc:
                jobs.append(Job(config, seed, None, INVALID, error=str(exc), command=command))
                continue
            status = SKIPPED if read_status(folder).get("status") == COMPLETE else "pending"
            jobs.append(Job(config, seed, folder, status, command=command))
    return jobs


def run_jobs(
    jobs: list[Job],
    runner: Runner = subprocess_runner,
    retries: int = 1,
    progress: Callable[[int, int, Job], None] | None = None,
) -> list[Job]:
    """Run the pending jobs in order; a failure is retried ``retries`` times, then reported."""
    from strato_peft.results import COMPLETE, read_status

    pending = [j for j in jobs if j.status == "pending"]
    for index, job in enumerate(pending, start=1):
        if progress is not None:
            progress(index, len(pending), job)
        start = time.perf_counter()
        while job.attempts <= retries:
            job.attempts += 1
            code = runner(job.command)
            status = read_status(job.run_dir).get("status") if job.run_dir else None
            if code == 0 and status in (None, COMPLETE):
                job.status = DONE if job.attempts == 1 else RETRIED
                break
            job.status = FAILED
            error = read_status(job.run_dir).get("error") if job.run_dir else None
            job.error = f"exit code {code}" + (f": {error}" if error else "")
        job.seconds = time.perf_counter() - start
    return jobs
