"""Tokenised training data: prompt tokens masked, answer tokens learned.

Each example becomes ``input_ids = prompt + target`` (truncated from the left of the
prompt when it is too long, so the answer survives) and ``labels`` equal to the input
with the prompt positions set to ``-100``. Batches are right-padded per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from strato_peft.tasks import Example, Task

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenised example."""

    input_ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def encode(prompt: str, target: str, tokenizer: Any, max_length: int) -> Encoded | None:
    """Tokenise one (prompt, target) pair; ``None`` if no target token fits."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        return None
    if len(target_ids) >= max_length:
        target_ids = target_ids[: max_length - 1]
        prompt_ids = prompt_ids[-1:]
    elif len(prompt_ids) + len(target_ids) > max_length:
        prompt_ids = prompt_ids[-(max_length - len(target_ids)) :]
    ids = [*prompt_ids, *target_ids]
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(target_ids)
    return Encoded(ids, labels)


def encode_examples(
    task: Task, examples: list[Example], tokenizer: Any, max_length: int
) -> list[Encoded]:
    """Format with the task's template and tokenise; drops (and counts) empty targets."""
    encoded = []
    for example in examples:
        prompt, target = task.format_for_training(example, tokenizer)
        item = encode(prompt, target, tokenizer, max_length)
        if item is not None:
            encoded.append(item)
    if len(encoded) < len(examples):
        log.warning("dropped %d examples with no answer tokens", len(examples) - len(encoded))
    if not encoded:
        raise ValueError("no training examples left after tokenisation")
    return encoded


class EncodedDataset(torch.utils.data.Dataset[Encoded]):
    """A list of :class:`Encoded` as a map-style dataset."""

    def __init__(self, items: list[Encoded]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Encoded:
        return self.items[index]


class Collator:
    """Right-pad a list of :class:`Encoded` into tensors."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(item.input_ids) for item in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            labels[row, :n] = torch.tensor(item.labels)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over answer tokens, and their count.

    Returning the sum (not the mean) lets the loop normalise by the number of answer
    tokens in the whole optimizer step across micro-batches and processes, so the
    gradient is the same however the global batch is split.
    """
    # Shift the labels, not the logits: slicing the logits would copy the whole
    # batch x seq x vocab tensor (and again in the backward); the padded last position
    # is ignored, so the sum and the count are unchanged.
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (shift_labels != IGNORE_INDEX).sum()


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (sum of answer-token losses, answer tokens predicted right, answer tokens).

    Teacher-forced answer-token accuracy: the next-token argmax equals the answer token.
    Per-row sums let a report resample problems (a bootstrap interval over examples).
    """
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = shift_labels != IGNORE_INDEX
    losses = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    correct = (logits.argmax(-1) == shift_labels) & mask
    return (losses * mask).sum(1), correct.sum(1), mask.sum(1)
