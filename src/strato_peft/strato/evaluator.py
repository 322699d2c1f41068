"""Real evaluations: a short fine-tune of one allocation, then the held-out loss.

Every allocation is trained from the same starting point on the same batches in the
same order, with the same seed for the adapters' initialisation (common random
numbers): differences between two evaluations come from the allocations, not from
which examples or initialisation each happened to get.

Why not the run's :class:`~strato_peft.training.loop.Trainer`: an evaluation needs no
checkpoints, trackers or progress bars, it must reuse the tokenised data across a
dozen allocations, and it must leave the base model untouched; the recipe (AdamW,
the run's learning rate, warm-up and schedule, answer-token loss) is the same.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from strato_peft.costs import Slot
from strato_peft.training.data import Collator, Encoded, token_loss_sum

log = logging.getLogger(__name__)


class RealEvaluator:
    """Short fine-tunes of allocations on a fixed base model (see the module docstring)."""

    def __init__(
        self,
        base: torch.nn.Module,
        train: list[Encoded],
        held_out: list[Encoded],
        *,
        steps: int,
        batch_size: int,
        eval_batch_size: int,
        grad_accum: int,
        learning_rate: float,
        weight_decay: float,
        warmup_ratio: float,
        lr_scheduler: str,
        max_grad_norm: float | None,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        seed: int,
        device: torch.device,
        pad_token_id: int,
    ) -> None:
        self.base = base
        self.steps = steps
        self.grad_accum = grad_accum
        self.lr = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.lr_scheduler = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        self.seed = seed
        self.device = device
        collate = Collator(pad_token_id)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train), generator=generator).tolist()
        needed = steps * grad_accum * batch_size
        order = (order * math.ceil(needed / len(order)))[:needed]
        self.batches = [
            collate([train[i] for i in order[k : k + batch_size]])
            for k in range(0, needed, batch_size)
        ]
        self.eval_batches = [
            collate(held_out[k : k + eval_batch_size])
            for k in range(0, len(held_out), eval_batch_size)
        ]

    def _peft(self, allocation: Mapping[str, int]) -> Any:
        from peft import LoraConfig, get_peft_model

        names = sorted(allocation)
        ranks = [allocation[n] for n in names]
        default = max(set(ranks), key=ranks.count)
        config = LoraConfig(
            r=default,
            lora_alpha=self.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
            lora_dropout=self.lora_dropout,
            target_modules=names,
            rank_pattern={n: r for n, r in allocation.items() if r != default},
            use_rslora=self.use_rslora,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(self.seed)
        return get_peft_model(copy.deepcopy(self.base), config)

    @torch.no_grad()
    def held_out_loss(self, model: torch.nn.Module) -> float:
        model.eval()
        total = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for batch in self.eval_batches:
            out = model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
            )
            s, n = token_loss_sum(out.logits, batch["labels"].to(self.device))
            total += s.double().cpu()
            tokens += int(n)
        return float(total / max(tokens, 1))

    def base_loss(self) -> float:
        """Held-out loss of the base model (the empty allocation: score 0)."""
        return self.held_out_loss(self.base)

    def evaluate(self, allocation: Mapping[str, int]) -> tuple[float, float]:
        """Fine-tune ``allocation`` for the configured steps; (held-out loss, wall seconds)."""
        from transformers import get_scheduler

        if not allocation:
            return self.base_loss(), 0.0
        start = time.perf_counter()
        model = self._peft(allocation).to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = get_scheduler(
            self.lr_scheduler if self.lr_scheduler != "constant" else "constant_with_warmup",
            optimizer=optimizer,
            num_warmup_steps=int(self.warmup_ratio * self.steps),
            num_training_steps=self.steps,
        )
        model.train()
        for step in range(self.steps):
            window = self.batches[step * self.grad_accum : (step + 1) * self.grad_accum]
            total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
            for batch in window:
                out = model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                )
                loss_sum, _ = token_loss_sum(out.logits, batch["labels"].to(self.device))
                (loss_sum / max(total, 1)).backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss = self.held_out_loss(model)
        del model, optimizer
        return loss, time.perf_counter() - start


def probe_sensitivity(
    evaluator: RealEvaluator, slots: list[Slot], batches: int, rank: int = 8
) -> list[float]:
    """Per-slot sensitivity: |dL/dB| of a temporary LoRA at initialisation (B = 0).

    With ``B = 0`` the adapter does not change the model yet; the gradient of ``B`` is
    the first-order gain of opening that slot, measured on the task's training batches
    (the first ``batches`` of the evaluator's fixed order). Returned in slot order,
    normalised to mean 1.
    """
    allocation = {s.name: rank for s in slots}
    model = evaluator._peft(allocation).to(evaluator.device)
    model.train()
    for batch in evaluator.batches[:batches]:
        out = model(
            input_ids=batch["input_ids"].to(evaluator.device),
            attention_mask=batch["attention_mask"].to(evaluator.device),
        )
        loss_sum, count = token_loss_sum(out.logits, batch["labels"].to(evaluator.device))
        (loss_sum / count.clamp(min=1)).backward()
    norms: dict[str, float] = {}
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if lora_b is None or "default" not in lora_b:
            continue
        grad = lora_b["default"].weight.grad
        key = name.split("base_model.model.", 1)[-1]
        norms[key] = float(grad.norm()) if grad is not None else 0.0
    missing = [s.name for s in slots if s.name not in norms]
    if missing:
        raise RuntimeError(f"sensitivity probe found no adapter for {missing[:3]}")
    values = [norms[s.name] for s in slots]
    mean = sum(values) / len(values) or 1.0
    del model
    return [v / mean for v in values]
