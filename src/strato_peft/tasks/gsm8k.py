"""GSM8K (Cobbe et al., 2021): grade-school math, greedy generation, exact match.

Scoring follows lm-evaluation-harness' ``gsm8k`` task: ``strict-match`` takes the
number after ``####``, ``flexible-extract`` the last number in the text; both are
normalised (``,`` and ``$`` removed, a trailing ``.`` dropped) and compared as
decimal numbers, so ``$1,234.00`` equals ``1234``. Reported side by side.

Splits: ``train`` = ``train.jsonl`` minus a fixed 5 % hold-out (by a hash of the
question) that is ``eval`` (training-time loss); ``test`` = ``test.jsonl`` (1319).
Subset ``easy``: problems whose reference solution has at most 3 calculator
annotations ``<<a*b=c>>`` (a proxy for the number of solution steps).
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar

from strato_peft.evaluation.statistics import summarize
from strato_peft.tasks.base import (
    DataError,
    Example,
    Task,
    hub_unavailable_reason,
    load_hub_split,
    read_jsonl,
    stable_fraction,
)

log = logging.getLogger(__name__)

STRICT = re.compile(r"#### \$?(-?[0-9.,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
ANNOTATION = re.compile(r"<<[^>]*>>")
EASY_MAX_STEPS = 3
HOLDOUT_FRACTION = 0.05
STOP = ("Question:", "</s>", "<|im_end|>", "<|endoftext|>")


def normalize_number(text: str | None) -> str | None:
    """Canonical form of a number string (``'$1,234.00'`` -> ``'1234'``), or ``None``."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_strict(text: str) -> str | None:
    """The number after the first ``####``, normalised (lm-eval ``strict-match``)."""
    match = STRICT.search(text)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text, normalised (lm-eval ``flexible-extract``)."""
    for match in reversed(FLEXIBLE.findall(text)):
        number = normalize_number(match[0] or match[1])
        if number is not None:
            return number
    return None


def solution_steps(answer: str) -> int:
    """Number of calculator annotations ``<<...>>`` in a reference solution."""
    return len(ANNOTATION.findall(answer))


class GSM8KTask(Task):
    """GSM8K with ``strict-match`` and ``flexible-extract`` accuracy."""

    name: ClassVar[str] = "gsm8k"
    hub_id: ClassVar[str] = "openai/gsm8k"
    subsets: ClassVar[dict[str, str]] = {
        "easy": f"problems whose solution has at most {EASY_MAX_STEPS} calculator annotations"
    }
    max_new_tokens: ClassVar[int] = 256

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.last_predictions: list[dict[str, Any]] = []

    def offline_hint(self) -> str:
        return super().offline_hint() + (
            ", or install reasoning-gym (pip install reasoning-gym) for generated gsm_symbolic problems"
        )

    # -- data ---------------------------------------------------------------------
    def _rows(self, file_split: str) -> list[dict[str, Any]]:
        local = self.local_dir()
        if local is not None:
            folder, label = local
            self.data_source = label
            return read_jsonl(Path(folder) / f"{file_split}.jsonl", required=("question", "answer"))
        reason = hub_unavailable_reason()
        if reason is None:
            self.data_source = f"hub:{self.hub_id}"
            return load_hub_split(self.hub_id, "main", file_split)
        try:
            import reasoning_gym
        except ImportError:
            raise self.no_source_error(reason) from None
        self.data_source = "packaged:reasoning-gym/gsm_symbolic"
        size, seed = (2000, 42) if file_split == "train" else (500, 4242)
        dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
        return [
            {"question": item["question"], "answer": f"#### {item['answer']}"} for item in dataset
        ]

    def load_split(self, split: str) -> list[Example]:
        file_split = "test" if split == "test" else "train"
        examples = []
        for index, row in enumerate(self._rows(file_split)):
            question, answer = str(row["question"]), str(row["answer"])
            gold = extract_strict(answer)
            if gold is None:
                raise DataError(
                    f"{self.data_source} {file_split} row {index + 1}: answer has no '#### <number>'"
                )
            if split != "test" and (stable_fraction(question) < HOLDOUT_FRACTION) != (
                split == "eval"
            ):
                continue
            steps = solution_steps(answer)
            if self.cfg.subset == "easy" and steps > EASY_MAX_STEPS:
                continue
            examples.append(
                Example(
                    id=f"{file_split}/{index}",
                    prompt=f"Question: {question}\nAnswer:",
                    target=answer,
                    metadata={"gold": gold, "steps": steps},
                )
            )
        if self.cfg.subset == "easy":
            log.info(
                "gsm8k easy (<= %d steps): %d %s problems qualify",
                EASY_MAX_STEPS,
                len(examples),
                split,
            )
        return examples

    # -- scoring --------------------------------------------------------------------
    def score(self, examples: list[Example], completions: list[str]) -> dict[str, Any]:
        strict = [
            float(extract_strict(c) == e.metadata["gold"])
            for e, c in zip(examples, completions, strict=True)
        ]
        flexible = [
            float(extract_flexible(c) == e.metadata["gold"])
            for e, c in zip(examples, completions, strict=True)
        ]
        return {
            **summarize("strict-match", strict),
            **summarize("flexible-extract", flexible),
            "n": len(examples),
        }

    def score_predictions(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows ``{"id": "test/<line index>", "completion": ...}`` against the test split."""
        by_id = {e.id: e for e in self._split("test")}
        examples, completions = [], []
        for key, values in self.index_predictions(rows, "completion").items():
            if key not in by_id:
                raise DataError(
                    f"unknown gsm8k id '{key}' (ids are 'test/<0-based line>' of test.jsonl)"
                )
            for value in values:
                examples.append(by_id[key])
                completions.append(str(value))
        return self.score(examples, completions)

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        limit: int | None = None,
        device: Any = None,
    ) -> dict[str, Any]:
        """Greedy generation on the test split (0-shot, chat template where present)."""
        from strato_peft.evaluation.runners import generate

        examples = self.test_examples(limit)
        prompts = [self.prompt_text(e, tokenizer) for e in examples]
        completions = [
            c[0]
            for c in generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=self.max_new_tokens,
                stop=STOP,
                batch_size=batch_size,
                device=device,
            )
        ]
        self.last_predictions = [
            {"id": e.id, "completion": c, "gold": e.metadata["gold"]}
            for e, c in zip(examples, completions, strict=True)
        ]
        return self.score(examples, completions)
