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
import json
import logging
import os
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


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file (``.gz`` allowed); a bad line raises :class:`DataError` naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[dict[str, Any]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
                    )
                missing = [key for key in required if key not in row]
                if missing:
                    raise DataError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
                rows.append(row)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    return rows


def read_csv_rows(path: Path, columns: int) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of a header-less CSV; a row with the wrong column count is a DataError."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for fields in reader:
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

    def index_predictions(self, rows: list[dict[str, Any]], field: str) -> dict[str, list[Any]]:
        """Group prediction rows by id (``task_id`` or ``id``); unknown ids are an error."""
        by_id: dict[str, list[Any]] = {}
        for number, row in enumerate(rows, start=1):
            key = row.get("task_id", row.get("id"))
            if key is None or field not in row:
                raise DataError(f"predictions row {number}: needs 'task_id' or 'id' and '{field}'")
            by_id.setdefault(str(key), []).append(row[field])
        return by_id


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
