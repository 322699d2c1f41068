"""Alpaca (Taori et al., 2023): instruction following, scored by held-out loss.

Data: a JSON array (or JSONL) of ``{"instruction", "input", "output"}`` records --
``task.data_path`` may be that file or a folder holding one (``alpaca_data.json``
first), likewise ``$STRATO_DATA_DIR/alpaca/``; else the hub's ``tatsu-lab/alpaca``.
A fixed 2 % of records (by a hash of instruction and input) is held out: it is both
``eval`` (training-time loss) and ``test`` (:meth:`AlpacaTask.evaluate` reports the
token-averaged loss on the targets and its perplexity ``exp(loss)``).
Subset ``10k``: a seeded sample (seed 42) of 10,000 training records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

from strato_peft.evaluation.statistics import mean_stderr
from strato_peft.tasks.base import (
    DataError,
    Example,
    Task,
    apply_chat,
    read_jsonl,
    read_text,
    stable_fraction,
)

FIELDS = ("instruction", "input", "output")
HOLDOUT_FRACTION = 0.02
SUBSET_SIZE = 10_000
SUBSET_SEED = 42
RAW_TEMPLATE = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON array file (or JSONL); errors name the file, the line and the problem."""
    if path.suffix == ".jsonl":
        return read_jsonl(path, required=FIELDS)
    text = read_text(path)
    decoder = json.JSONDecoder()

    def line_of(position: int) -> int:
        return text.count("\n", 0, position) + 1

    position = len(text) - len(text.lstrip())
    if not text[position:].startswith("["):
        raise DataError(f"{path}:{line_of(position)}: expected a JSON array of records")
    position += 1
    records: list[dict[str, Any]] = []
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text):
            raise DataError(f"{path}:{line_of(position)}: unterminated JSON array")
        if text[position] == "]":
            return records
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{line_of(position)}: expected an object, got {type(record).__name__}"
            )
        missing = [f for f in FIELDS if f not in record]
        if missing:
            raise DataError(
                f"{path}:{line_of(position)}: record {len(records) + 1} misses {', '.join(missing)}"
            )
        records.append(record)
        position = end


class AlpacaTask(Task):
    """Alpaca instruction tuning; evaluation = held-out loss and perplexity."""

    name: ClassVar[str] = "alpaca"
    hub_id: ClassVar[str] = "tatsu-lab/alpaca"
    subsets: ClassVar[dict[str, str]] = {
        "10k": f"seeded sample (seed {SUBSET_SEED}) of {SUBSET_SIZE} training records"
    }
    raw_separator: ClassVar[str] = ""

    def _records(self) -> list[dict[str, Any]]:
        local = self.local_dir()
        if local is not None:
            path, label = local
            if path.is_dir():
                candidates = sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl"))
                preferred = [c for c in candidates if c.name == "alpaca_data.json"]
                if not candidates:
                    raise DataError(f"{path}: no .json or .jsonl file in the Alpaca format")
                path = (preferred or candidates)[0]
            self.data_source = label
            return read_json_records(path)
        hub_rows = self.try_hub(None, "train")
        if hub_rows is None:
            raise self.no_source_error()
        return hub_rows

    def load_split(self, split: str) -> list[Example]:
        examples = []
        for index, record in enumerate(self._records()):
            instruction, input_, output = (str(record[f]) for f in FIELDS)
            held_out = stable_fraction(instruction + "\n" + input_) < HOLDOUT_FRACTION
            if held_out != (split in ("eval", "test")):
                continue
            user = instruction if not input_.strip() else f"{instruction}\n\n{input_}"
            examples.append(
                Example(
                    id=str(index),
                    prompt=user,
                    target=output,
                    metadata={"instruction": instruction, "input": input_},
                )
            )
        if split == "train" and self.cfg.subset == "10k":
            ranked = sorted(examples, key=lambda e: stable_fraction(e.id, SUBSET_SEED))
            chosen = {e.id for e in ranked[:SUBSET_SIZE]}
            examples = [e for e in examples if e.id in chosen]
        return examples

    def prompt_text(self, example: Example, tokenizer: Any) -> str:
        """The chat template where there is one, else the original Alpaca prompt."""
        if self.uses_chat(tokenizer):
            return apply_chat(tokenizer, example.prompt)
        input_ = example.metadata.get("input", "")
        return RAW_TEMPLATE.format(
            context=", paired with an input that provides further context"
            if input_.strip()
            else "",
            instruction=example.metadata.get("instruction", example.prompt),
            input_block=f"### Input:\n{input_}\n\n" if input_.strip() else "",
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        limit: int | None = None,
        device: Any = None,
    ) -> dict[str, Any]:
        """Token-averaged loss of the held-out targets and ``perplexity = exp(loss)``.

        The interval comes from the standard error of the per-example mean loss.
        """
        from strato_peft.evaluation.runners import encode_pair, loglikelihood

        examples = self.test_examples(limit)
        pairs = [self.format_for_training(e, tokenizer) for e in examples]
        scores = loglikelihood(model, tokenizer, pairs, batch_size=batch_size, device=device)
        lengths = [len(encode_pair(tokenizer, p, t)[1]) for p, t in pairs]
        total = -sum(s for s, _ in scores)
        loss = total / max(1, sum(lengths))
        per_example = [-s / n for (s, _), n in zip(scores, lengths, strict=True)]
        _, se = mean_stderr(per_example)
        return {
            "loss": loss,
            "loss_stderr": se,
            "loss_ci95": [loss - 1.96 * se, loss + 1.96 * se],
            "perplexity": math.exp(loss),
            "perplexity_ci95": [math.exp(loss - 1.96 * se), math.exp(loss + 1.96 * se)],
            "n": len(examples),
            "tokens": sum(lengths),
        }

    def score_predictions(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError(
            "alpaca is scored by held-out loss, which needs a model (use 'eval')"
        )
