"""The training recipe: data order, optimizer, schedule, loss and one optimizer step.

A run's training loop (:mod:`strato_peft.training.loop`) and every STRATO search
evaluation (:mod:`strato_peft.strato.evaluator`) train with the objects of this module,
so the two cannot drift apart:

* :class:`TrainingRecipe`: the settings (frozen, built once from the config), AdamW, the
  learning-rate schedule (``transformers.get_scheduler``), the seeded data order
  (accelerate's ``SeedableRandomSampler``: epoch ``e`` is a permutation seeded by
  ``seed + e``, the same on every process and after a resume);
* :func:`iterate_windows`: micro-batches grouped into optimizer steps, epoch after
  epoch, resumable from a :class:`DataPosition`;
* :class:`StepRunner`: forward, answer-token loss, backward, clipping, optimizer and
  scheduler step, the per-step hook, and the held-out loss.

The loss of an optimizer step is the sum of next-token cross-entropy over answer tokens
divided by the number of answer tokens in the whole step (all micro-batches, all
processes), so one process with batch 2B gets the same gradients as two with batch B.
The runner talks to an *accelerator*: ``accelerate.Accelerator`` in a run (DDP, mixed
precision), or :class:`LocalAccelerator`, its single-process equivalent for evaluations
that must not join a process group.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from strato_peft.encoding import (
    IGNORE_INDEX,
    Collator,
    Encoded,
    EncodedDataset,
    token_loss_sum,
    token_stats,
)

if TYPE_CHECKING:
    from strato_peft.config.schema import ExperimentConfig

Batch = dict[str, torch.Tensor]

#: ``training.lr_scheduler`` -> ``transformers.get_scheduler`` name (warm-up in all three).
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class TrainingRecipe:
    """How a run trains (``training`` section and seed); see the module docstring."""

    batch_size: int
    eval_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    lr_scheduler: str
    warmup_ratio: float
    max_grad_norm: float | None
    seed: int

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> TrainingRecipe:
        t = config.training
        return cls(
            batch_size=t.batch_size,
            eval_batch_size=t.eval_batch_size or t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=t.learning_rate,
            weight_decay=t.weight_decay,
            lr_scheduler=t.lr_scheduler,
            warmup_ratio=t.warmup_ratio,
            max_grad_norm=t.max_grad_norm,
            seed=config.seed,
        )

    def fingerprint(self) -> dict[str, Any]:
        """Every setting, as JSON-able values: part of a search's protocol fingerprint."""
        return asdict(self)

    def warmup_steps(self, total_steps: int) -> int:
        return int(self.warmup_ratio * total_steps)

    def optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        from transformers import get_scheduler

        return get_scheduler(
            SCHEDULERS[self.lr_scheduler],
            optimizer=optimizer,
            num_warmup_steps=self.warmup_steps(total_steps),
            num_training_steps=total_steps,
        )

    def train_loader(self, items: list[Encoded], pad_token_id: int) -> torch.utils.data.DataLoader:
        """Shuffled micro-batches; epoch ``e`` is the permutation seeded by ``seed + e``."""
        from accelerate.data_loader import SeedableRandomSampler

        dataset = EncodedDataset(items)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=SeedableRandomSampler(dataset, data_seed=self.seed),
            collate_fn=Collator(pad_token_id),
            generator=self._loader_generator(),
        )

    def eval_loader(self, items: list[Encoded], pad_token_id: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            EncodedDataset(items),
            batch_size=self.eval_batch_size,
            collate_fn=Collator(pad_token_id),
            generator=self._loader_generator(),
        )

    def _loader_generator(self) -> torch.Generator:
        """A loader's own generator: each iterator draws a worker seed from it, which would
        otherwise come from the global RNG and shift dropout's stream (after a resume, or
        between a run and a search evaluation)."""
        return torch.Generator().manual_seed(self.seed)


@dataclass
class DataPosition:
    """Where the data order stands: the epoch and the micro-batches consumed in it."""

    epoch: int = 0
    batches_in_epoch: int = 0


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell a loader (accelerate's, or a plain one with a seedable sampler) the epoch."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def iterate_windows(loader: Any, size: int, position: DataPosition) -> Iterator[list[Batch]]:
    """Optimizer steps of ``size`` micro-batches, epoch after epoch, without end.

    ``position`` is advanced *before* a window is handed out, so a checkpoint written
    after its step resumes with the next one; the last window of an epoch may be short.
    """
    from accelerate import skip_first_batches

    while True:
        set_epoch(loader, position.epoch)
        batches = (
            skip_first_batches(loader, position.batches_in_epoch)
            if position.batches_in_epoch
            else loader
        )
        window: list[Batch] = []
        for batch in batches:
            window.append(batch)
            if len(window) == size:
                position.batches_in_epoch += len(window)
                yield window
                window = []
        if window:
            position.batches_in_epoch += len(window)
            yield window
        position.epoch += 1
        position.batches_in_epoch = 0


def answer_tokens(batch: Batch) -> int:
    """Answer tokens of a micro-batch that carry loss (next-token targets)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class LocalAccelerator:
    """The part of ``accelerate.Accelerator`` that :class:`StepRunner` uses, for one process.

    Search evaluations run on the main process only while the others wait, so they must
    not join DDP's collectives; this gives them the run's device and its bf16 autocast.
    Under fp16 mixed precision (GPUs without bf16) evaluations run in fp32: fp16 needs a
    loss scaler, and a short evaluation gains little from it.
    """

    num_processes = 1
    is_main_process = True

    def __init__(
        self, device: torch.device | str, autocast_dtype: torch.dtype | None = None
    ) -> None:
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

    @classmethod
    def like(cls, accelerator: Any) -> LocalAccelerator:
        """The single-process equivalent of an ``accelerate.Accelerator``."""
        bf16 = str(getattr(accelerator, "mixed_precision", "no")) == "bf16"
        return cls(accelerator.device, torch.bfloat16 if bf16 else None)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def unwrap_model(self, model: Any) -> Any:
        return model


class StepRunner:
    """One optimizer step of the recipe over a window of micro-batches.

    ``regularization(model)`` (AdaLoRA's orthogonality term) is added once per step;
    ``on_step()`` runs after the optimizer and scheduler stepped and before the
    gradients are zeroed (peft's ``update_and_allocate`` contract).
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        recipe: TrainingRecipe,
        accelerator: Any,
        *,
        regularization: Callable[[Any], torch.Tensor | None] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.recipe = recipe
        self.accelerator = accelerator
        self.regularization = regularization

    def loss_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one micro-batch: (sum of answer-token losses, answer tokens)."""
        device = self.accelerator.device
        with self.accelerator.autocast():
            out = self.model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            )
        return token_loss_sum(out.logits, batch["labels"].to(device))

    def step(
        self, window: list[Batch], on_step: Callable[[], None] | None = None
    ) -> tuple[float, int]:
        """Train on ``window``; returns (mean answer-token loss, answer tokens of the step)."""
        acc = self.accelerator
        local = torch.tensor(sum(answer_tokens(b) for b in window), device=acc.device)
        total_tokens = max(int(acc.reduce(local, reduction="sum").item()), 1)
        scale = acc.num_processes / total_tokens
        loss_sum = torch.zeros((), device=acc.device)
        for index, batch in enumerate(window):
            last = index == len(window) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                loss_sum += self._backward(batch, scale, len(window))
        if self.recipe.max_grad_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.recipe.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if on_step is not None:
            on_step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(loss_sum, reduction="sum").item()) / total_tokens, total_tokens

    def _backward(self, batch: Batch, scale: float, n_micro: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its (detached) loss sum.

        A function of its own so that the autograd graph (which holds the parameters'
        gradient accumulators) is gone when the per-step hook may resize parameters.
        """
        loss_sum, _ = self.loss_sum(batch)
        loss = loss_sum * scale
        if self.regularization is not None:
            extra = self.regularization(self.accelerator.unwrap_model(self.model))
            if extra is not None:
                loss = loss + extra / n_micro
        self.accelerator.backward(loss)
        return loss_sum.detach()

    @torch.no_grad()
    def held_out_loss(self, loader: Any) -> float:
        """Mean answer-token loss over ``loader`` (all processes); leaves train mode on."""
        acc = self.accelerator
        self.model.eval()
        loss_sum = torch.zeros((), device=acc.device)  # float32: MPS has no float64
        tokens = torch.zeros((), device=acc.device)
        for batch in loader:
            s, n = self.loss_sum(batch)
            loss_sum += s
            tokens += n
        self.model.train()
        loss_sum = acc.reduce(loss_sum, reduction="sum")
        tokens = acc.reduce(tokens, reduction="sum")
        return float(loss_sum.item() / max(tokens.item(), 1))

    @torch.no_grad()
    def held_out_stats(self, loader: Any) -> HeldOutStats:
        """Per-example loss sums, right answer tokens and answer tokens (this process)."""
        device = self.accelerator.device
        self.model.eval()
        stats = HeldOutStats()
        for batch in loader:
            with self.accelerator.autocast():
                out = self.model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                )
            losses, correct, count = token_stats(out.logits, batch["labels"].to(device))
            stats.loss_sums += losses.double().cpu().tolist()
            stats.correct += correct.cpu().tolist()
            stats.tokens += count.cpu().tolist()
        self.model.train()
        return stats


@dataclass
class HeldOutStats:
    """Teacher-forced statistics of a held-out split, one entry per example."""

    loss_sums: list[float] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return sum(self.loss_sums) / max(sum(self.tokens), 1)

    @property
    def token_accuracy(self) -> float:
        """Answer tokens predicted right, in percent of all answer tokens (points)."""
        return 100.0 * sum(self.correct) / max(sum(self.tokens), 1)

    def summary(self, iterations: int = 1000, seed: int = 1234) -> dict[str, Any]:
        """Loss and accuracy (points) with a standard error and a bootstrap 95% interval
        over examples (ratio estimators: examples are resampled with their tokens)."""
        import random

        n = len(self.tokens)
        if n == 0:
            raise ValueError("no held-out examples to report on")
        rng = random.Random(seed)
        acc, loss = [], []
        for _ in range(iterations):
            idx = [rng.randrange(n) for _ in range(n)]
            t = max(sum(self.tokens[i] for i in idx), 1)
            acc.append(100.0 * sum(self.correct[i] for i in idx) / t)
            loss.append(sum(self.loss_sums[i] for i in idx) / t)
        acc.sort()
        loss.sort()
        lo, hi = int(0.025 * (iterations - 1)), int(0.975 * (iterations - 1)) + 1
        return {
            "n": n,
            "answer_tokens": sum(self.tokens),
            "eval_loss": self.loss,
            "eval_loss_stderr": statistics.pstdev(loss),
            "eval_loss_ci95": [loss[lo], loss[hi]],
            "token_accuracy": self.token_accuracy,
            "token_accuracy_stderr": statistics.pstdev(acc),
            "token_accuracy_ci95": [acc[lo], acc[hi]],
        }
