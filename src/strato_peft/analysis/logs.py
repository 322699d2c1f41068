"""Profile traces and training logs, summarised.

``--profile`` records a 10-step ``torch.profiler`` window each epoch into
``logs/profiles/`` as Chrome-trace JSON (``*.pt.trace.json``, what
``tensorboard_trace_handler`` writes). :func:`profile_summary` totals the complete
("X") events by operator name: the few ops that dominate a step. ``training.log``
lines look like ``2026-11-28 12:59:52,510 INFO strato_peft.training.run: message``;
:func:`log_summary` counts levels, lists warnings and errors, and which runs started,
completed or failed.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACE_PATTERNS = ("*.pt.trace.json", "*.pt.trace.json.gz", "*.trace.json")
LOG_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)?) (?P<level>[A-Z]+) (?P<logger>[\w.]+): "
    r"(?P<message>.*)$"
)

RUN_STARTED = re.compile(r"^run (\S+) \(")


@dataclass(frozen=True)
class OpStat:
    name: str
    category: str
    calls: int
    total_us: float

    @property
    def mean_us(self) -> float:
        return self.total_us / self.calls if self.calls else 0.0


@dataclass
class ProfileSummary:
    traces: list[Path]
    ops: list[OpStat]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def total_us(self) -> float:
        return sum(op.total_us for op in self.ops)


def _load_trace(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    if isinstance(data, list):
        return {"traceEvents": data}
    if not isinstance(data, dict):
        raise ValueError("not a Chrome trace")
    return data


def profile_summary(
    profile_dir: Path, categories: tuple[str, ...] = ("cpu_op", "kernel")
) -> ProfileSummary:
    """Total time per operator over every trace under ``profile_dir`` (sorted, largest first)."""
    traces = sorted({p for pattern in TRACE_PATTERNS for p in Path(profile_dir).rglob(pattern)})
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    unreadable: list[tuple[Path, str]] = []
    for path in traces:
        try:
            events = _load_trace(path).get("traceEvents") or []
        except (OSError, ValueError, EOFError) as exc:
            unreadable.append((path, f"{exc.__class__.__name__}: {exc}"))
            continue
        for event in events:
            if not isinstance(event, dict) or event.get("ph") != "X":
                continue
            category = str(event.get("cat", ""))
            if categories and category not in categories:
                continue
            entry = totals[(str(event.get("name", "?")), category)]
            entry[0] += 1
            entry[1] += float(event.get("dur", 0.0))
    ops = [OpStat(name, cat, int(n), total) for (name, cat), (n, total) in totals.items()]
    ops.sort(key=lambda op: op.total_us, reverse=True)
    return ProfileSummary(
        traces=[p for p in traces if p not in dict(unreadable)], ops=ops, unreadable=unreadable
    )


@dataclass
class LogSummary:
    lines: int
    levels: Counter[str]
    first: str | None
    last: str | None
    started: list[str]
    completed: list[str]
    failed: list[str]
    problems: list[str]
    """WARNING, ERROR and CRITICAL lines (with continuation lines such as tracebacks)."""
    losses: list[float]


def log_summary(log_file: Path) -> LogSummary:
    """Parse a ``training.log``; lines that do not match the format continue the previous one."""
    levels: Counter[str] = Counter()
    started: list[str] = []
    completed: list[str] = []
    failed: list[str] = []
    problems: list[str] = []
    losses: list[float] = []
    first = last = None
    count = 0
    in_problem = False
    with open(log_file, encoding="utf-8", errors="replace") as handle:
        for raw in handle:
            line = raw.rstrip("\n")
            count += 1
            match = LOG_LINE.match(line)
            if match is None:
                if in_problem and line.strip():
                    problems[-1] += "\n" + line
                continue
            level, message = match.group("level"), match.group("message")
            levels[level] += 1
            first = first or match.group("time")
            last = match.group("time")
            in_problem = level in ("WARNING", "ERROR", "CRITICAL")
            if in_problem:
                problems.append(f"{match.group('time')} {level} {message}")
            started_run = RUN_STARTED.match(message)
            if started_run:
                started.append(started_run.group(1))
            elif message.startswith("complete: "):
                completed.append(message[len("complete: ") :].split(" ")[0])
            elif "failed" in message.lower() and level in ("ERROR", "CRITICAL"):
                failed.append(message)
            loss = re.search(r"\bloss[ =:]+(\d+(?:\.\d+)?)", message)
            if loss:
                losses.append(float(loss.group(1)))
    return LogSummary(count, levels, first, last, started, completed, failed, problems, losses)
