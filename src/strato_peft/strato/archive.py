"""Go-Explore archive: every real evaluation, durably, under a canonical allocation hash.

SQLite (standard library; one file, atomic commits, safe when the process is killed
between two evaluations). A row is committed the moment its evaluation finishes, so a
search killed with SIGKILL loses at most the evaluation that was running. Rows are
keyed by ``(protocol, allocation hash)``: the protocol fingerprints everything that
changes what an evaluation measures (model, task, steps, data, seed ...), so a shared
archive file never mixes incomparable scores and never evaluates an allocation twice
under the same protocol.

Cells group allocations by cost (params and FLOPs fractions of the reference, in
buckets); each cell's *elite* is its best evaluated allocation, the place an episode
returns to before exploring.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strato_peft.results import ARCHIVE_FILE, RunFileError

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    protocol TEXT NOT NULL,
    hash TEXT NOT NULL,
    allocation TEXT NOT NULL,
    eval_loss REAL NOT NULL,
    params INTEGER NOT NULL,
    params_fraction REAL NOT NULL,
    flops_per_token REAL NOT NULL,
    flops_fraction REAL NOT NULL,
    memory_bytes REAL NOT NULL,
    wall_time_s REAL NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (protocol, hash)
)
"""

NUMERIC_COLUMNS = (
    "eval_loss", "params", "params_fraction", "flops_per_token", "flops_fraction",
    "memory_bytes", "wall_time_s", "created_at",
)  # fmt: skip


@dataclass
class Evaluation:
    """One real evaluation (a short fine-tune and the held-out loss)."""

    hash: str
    allocation: dict[str, int]
    eval_loss: float
    params: int
    params_fraction: float
    flops_per_token: float
    flops_fraction: float
    memory_bytes: float
    wall_time_s: float
    source: str
    created_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    def cell(self, width: float = 0.1) -> tuple[int, int]:
        return int(self.params_fraction / width), int(self.flops_fraction / width)


class Archive:
    """The SQLite archive of one protocol (see the module docstring)."""

    def __init__(self, path: Path, protocol: str) -> None:
        self.path = Path(path)
        self.protocol = protocol
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=60)
            self._db.execute(SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise RunFileError(f"{self.path}: not a usable STRATO archive ({exc})") from None
        self.visits: dict[tuple[int, int], int] = {}

    def close(self) -> None:
        self._db.close()

    def __contains__(self, allocation_hash: object) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM evaluations WHERE protocol=? AND hash=?",
            (self.protocol, allocation_hash),
        ).fetchone()
        return row is not None

    def __len__(self) -> int:
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM evaluations WHERE protocol=?", (self.protocol,)
        ).fetchone()
        return int(count)

    def get(self, allocation_hash: str) -> Evaluation | None:
        rows = self._select("AND hash=?", (allocation_hash,))
        return rows[0] if rows else None

    def add(self, evaluation: Evaluation) -> None:
        """Store one evaluation; a second evaluation of the same allocation is a bug."""
        e = evaluation
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO evaluations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        self.protocol, e.hash, json.dumps(e.allocation, sort_keys=True),
                        e.eval_loss, e.params, e.params_fraction, e.flops_per_token,
                        e.flops_fraction, e.memory_bytes, e.wall_time_s, e.source, e.created_at,
                        json.dumps(e.extra, sort_keys=True),
                    ),
                )  # fmt: skip
        except sqlite3.IntegrityError:
            raise RuntimeError(
                f"allocation {e.hash} is already in the archive {self.path}: "
                "the search must never evaluate an allocation twice"
            ) from None

    def evaluations(self) -> list[Evaluation]:
        """Every evaluation of this protocol, oldest first."""
        return self._select("", ())

    def _select(self, where: str, args: tuple[Any, ...]) -> list[Evaluation]:
        try:
            rows = self._db.execute(
                "SELECT rowid, hash, allocation, eval_loss, params, params_fraction, "
                "flops_per_token, flops_fraction, memory_bytes, wall_time_s, source, created_at, "
                f"extra FROM evaluations WHERE protocol=? {where} ORDER BY created_at, rowid",
                (self.protocol, *args),
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise RunFileError(f"{self.path}: not a readable STRATO archive ({exc})") from None
        return [self._evaluation(row) for row in rows]

    def _evaluation(self, row: tuple[Any, ...]) -> Evaluation:
        """One row as an :class:`Evaluation`; a malformed row is a :class:`RunFileError`
        naming the archive file, the row and the column."""
        rowid, hash_, allocation, *numbers, source, created_at, extra = row

        def bad(column: str, problem: str) -> RunFileError:
            return RunFileError(
                f"{self.path}: row {rowid} (allocation {hash_}): column '{column}' {problem}"
            )

        def json_object(column: str, text: Any) -> dict[str, Any]:
            try:
                value = json.loads(text)
            except (TypeError, json.JSONDecodeError) as exc:
                raise bad(column, f"is not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise bad(column, f"is not a JSON object (got {type(value).__name__})")
            return value

        alloc = json_object("allocation", allocation)
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in alloc.values()):
            raise bad("allocation", "must map module names to integer ranks")
        for column, value in zip(NUMERIC_COLUMNS, [*numbers, created_at], strict=True):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(column, f"is not a number (got {value!r})")
        return Evaluation(
            hash=hash_,
            allocation=alloc,
            eval_loss=numbers[0],
            params=numbers[1],
            params_fraction=numbers[2],
            flops_per_token=numbers[3],
            flops_fraction=numbers[4],
            memory_bytes=numbers[5],
            wall_time_s=numbers[6],
            source=source,
            created_at=created_at,
            extra=json_object("extra", extra),
        )

    def elites(self, score: Any, width: float = 0.1) -> dict[tuple[int, int], Evaluation]:
        """Best evaluation (by ``score(evaluation)``) of every cost cell."""
        best: dict[tuple[int, int], Evaluation] = {}
        for e in self.evaluations():
            if not e.extra.get("candidate", True):
                continue
            cell = e.cell(width)
            if cell not in best or score(e) > score(best[cell]):
                best[cell] = e
        return best


def open_archive(search: Any, folder: Path, protocol: str) -> Archive:
    """The search's archive: ``search.archive_path`` when set (shared between runs), else
    ``archive.sqlite`` in the run folder."""
    path = Path(search.archive_path) if search.archive_path else folder / ARCHIVE_FILE
    return Archive(path, protocol)
