"""MMLU (Hendrycks et al., 2021): 57 subjects of four-way multiple choice.

Evaluation follows lm-evaluation-harness' ``mmlu`` (default template): the
description ``The following are multiple choice questions (with answers) about
<subject>.``, ``k`` exemplars from the subject's ``dev`` split (the first ``k``,
``task.num_fewshot``, default 5), then ``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:``;
the prediction is the letter whose continuation ``" A"`` .. ``" D"`` has the highest
log-likelihood. No chat template (as lm-eval), so scores compare with published ones.

Splits (default): ``train`` = ``val`` (1531), ``eval`` = ``dev`` (285, the
exemplar pool, never trained on), ``test`` = ``test`` (14042). Subset ``dev``
never touches ``test``: ``val`` is split by a hash of each question into a training
half and an evaluation half.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

from strato_peft.evaluation.statistics import summarize
from strato_peft.tasks.base import (
    DataError,
    Example,
    Task,
    read_csv_rows,
    stable_fraction,
)

LETTERS = ("A", "B", "C", "D")
FOLDERS = {"dev": "dev", "val": "val", "test": "test"}
HUB_SPLITS = {"dev": "dev", "val": "validation", "test": "test"}


def describe(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(question: str, choices: list[str]) -> str:
    options = "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)
    )
    return f"{question.strip()}{options}\nAnswer:"


class MMLUTask(Task):
    """MMLU with 5-shot log-likelihood accuracy, overall and per subject."""

    name: ClassVar[str] = "mmlu"
    hub_id: ClassVar[str] = "cais/mmlu"
    subsets: ClassVar[dict[str, str]] = {
        "dev": "no test split: val halves (by question hash) for training and evaluation"
    }
    chat_template: ClassVar[bool] = False
    append_eos: ClassVar[bool] = False
    prediction_field: ClassVar[str] = "choice"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.last_predictions: list[dict[str, Any]] = []
        self._raw: dict[str, list[Example]] = {}

    @property
    def num_fewshot(self) -> int:
        return 5 if self.cfg.num_fewshot is None else self.cfg.num_fewshot

    # -- data ---------------------------------------------------------------------
    def raw_split(self, split: str) -> list[Example]:
        """All questions of an original split (``dev``, ``val`` or ``test``), file order."""
        if split not in self._raw:
            self._raw[split] = self._read(split)
        return self._raw[split]

    def _read(self, split: str) -> list[Example]:
        local = self.local_dir()
        examples: list[Example] = []
        counts: dict[str, int] = defaultdict(int)

        def next_id(subject: str) -> str:
            counts[subject] += 1
            return f"{subject}/{split}/{counts[subject] - 1}"

        if local is not None:
            root, label = local
            self.data_source = label
            folder = Path(root) / FOLDERS[split]
            files = sorted(folder.glob(f"*_{split}.csv"))
            if not files:
                raise DataError(
                    f"{folder}: no *_{split}.csv files (expected the original MMLU layout)"
                )
            for path in files:
                subject = path.name[: -len(f"_{split}.csv")]
                for line, fields in read_csv_rows(path, columns=6):
                    answer = fields[5].strip()
                    if answer not in LETTERS:
                        raise DataError(f"{path}:{line}: answer must be one of A-D, got {answer!r}")
                    examples.append(
                        self._example(next_id(subject), subject, fields[0], fields[1:5], answer)
                    )
            return examples
        hub_rows = self.try_hub("all", HUB_SPLITS[split])
        if hub_rows is None:
            raise self.no_source_error()
        for row in hub_rows:
            answer = LETTERS[int(row["answer"])]
            subject = str(row["subject"])
            examples.append(
                self._example(
                    next_id(subject), subject, row["question"], list(row["choices"]), answer
                )
            )
        return examples

    @staticmethod
    def _example(id_: str, subject: str, question: str, choices: list[str], answer: str) -> Example:
        return Example(
            id=id_,
            prompt=describe(subject) + question_text(question, choices),
            target=answer,
            metadata={
                "subject": subject,
                "question": question_text(question, choices),
                "answer": answer,
                "raw": {"question": question, "choices": list(choices)},
            },
        )

    def load_split(self, split: str) -> list[Example]:
        if self.cfg.subset == "dev":
            if split == "eval":
                return self.raw_split("dev")
            keep_half = 0 if split == "train" else 1
            return [
                e
                for e in self.raw_split("val")
                if int(stable_fraction(e.prompt) >= 0.5) == keep_half
            ]
        return self.raw_split({"train": "val", "eval": "dev", "test": "test"}[split])

    def fewshot_context(self, example: Example) -> str:
        """Description, the first ``k`` dev exemplars of the subject, then the question."""
        subject = example.metadata["subject"]
        shots = [e for e in self.raw_split("dev") if e.metadata["subject"] == subject][
            : self.num_fewshot
        ]
        blocks = [f"{e.metadata['question']} {e.metadata['answer']}" for e in shots]
        return describe(subject) + "\n\n".join([*blocks, example.metadata["question"]])

    # -- scoring --------------------------------------------------------------------
    def score(self, examples: list[Example], choices: list[str]) -> dict[str, Any]:
        correct = [float(c == e.target) for e, c in zip(examples, choices, strict=True)]
        metrics = {**summarize("acc", correct), "n": len(examples)}
        per_subject: dict[str, list[float]] = defaultdict(list)
        for example, value in zip(examples, correct, strict=True):
            per_subject[example.metadata["subject"]].append(value)
        metrics["acc_per_subject"] = {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}
        return metrics

    def score_predictions(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows ``{"id": "<subject>/test/<index>", "choice": "A".."D" or 0..3}``."""
        by_id = {e.id: e for e in self._split("test")}
        examples, choices = [], []
        for key, values in self.index_predictions(rows, self.prediction_field).items():
            if key not in by_id:
                raise DataError(f"unknown mmlu id '{key}'")
            for value in values:
                letter = (
                    LETTERS[value]
                    if isinstance(value, int) and 0 <= value < 4
                    else str(value).strip()
                )
                if letter not in LETTERS:
                    raise DataError(f"mmlu id '{key}': choice must be A-D or 0-3, got {value!r}")
                examples.append(by_id[key])
                choices.append(letter)
        return self.score(examples, choices)

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        limit: int | None = None,
        device: Any = None,
        examples: list[Example] | None = None,
    ) -> dict[str, Any]:
        """k-shot log-likelihood accuracy on the test split (or on ``examples``)."""
        from strato_peft.evaluation.runners import loglikelihood

        examples = self.test_examples(limit) if examples is None else examples
        requests = [(self.fewshot_context(e), f" {letter}") for e in examples for letter in LETTERS]
        scores = loglikelihood(model, tokenizer, requests, batch_size=batch_size, device=device)
        choices = []
        for i, _example in enumerate(examples):
            row = [scores[4 * i + j][0] for j in range(4)]
            choices.append(LETTERS[row.index(max(row))])
        self.last_predictions = [
            {"id": e.id, "choice": c, "gold": e.target}
            for e, c in zip(examples, choices, strict=True)
        ]
        return self.score(examples, choices)
