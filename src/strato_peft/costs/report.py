"""One call that prices an allocation: params, FLOPs and memory in a :class:`CostReport`.

Trainable parameters, per adapted module of shape ``d_in -> d_out`` with rank ``r``:
LoRA's ``A`` (``r x d_in``) and ``B`` (``d_out x r``), ``r (d_in + d_out)``; a
magnitude vector (DoRA) adds ``d_out``; singular values (AdaLoRA's ``E``) add ``r``
(the allocated rank). Which of these a method has is its
:class:`~strato_peft.costs.terms.CostTerms`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from strato_peft.costs.allocation import (
    Allocation,
    adalora_effective_ranks,
    allocation_from_peft_model,
    lowest_adapted_layer,
    resolve_allocation,
)
from strato_peft.costs.architecture import Architecture
from strato_peft.costs.flops import FlopCount, training_flops
from strato_peft.costs.memory import MemoryEstimate, memory_estimate
from strato_peft.costs.terms import (
    DEFAULT_SETTINGS,
    PLAIN_LORA,
    CostSettings,
    CostTerms,
    cost_terms_of_peft_model,
)


def trainable_params(
    arch: Architecture, allocation: Mapping[str, int], terms: CostTerms = PLAIN_LORA
) -> int:
    """Trainable parameters of the adapters; equals ``sum(p.numel())`` over peft's trainable params.

    ``r (d_in + d_out)`` per adapted module, ``+ d_out`` with a magnitude vector,
    ``+ r`` with singular values (see the module docstring).
    """
    total = 0
    for slot, rank in resolve_allocation(arch, allocation):
        total += rank * (slot.d_in + slot.d_out)
        if terms.magnitude_vector:
            total += slot.d_out
        if terms.singular_values:
            total += rank
    return total


@dataclass(frozen=True)
class CostReport:
    """Costs of training one allocation; ``to_dict()`` is the JSON of the dry run and run folder.

    Per-token figures are per trained token of a micro-batch (per-call terms
    such as DoRA's norm amortised over its ``batch_size x seq_len`` tokens);
    a step is one optimizer step, ``grad_accum_steps`` micro-batches.
    ``terms`` and ``settings`` are what was priced.
    """

    architecture: str
    terms: CostTerms
    settings: CostSettings
    trainable_params: int
    adapted_modules: int
    lowest_adapted_layer: int | None
    flops: FlopCount
    memory: MemoryEstimate
    effective_trainable_params: int | None = None
    rank_total: int = 0
    """Sum of the allocated ranks over adapted modules."""
    effective_rank_total: int | None = None
    """AdaLoRA: sum of the ranks its masks keep (``None`` for other methods)."""

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def seq_len(self) -> int:
        return self.settings.seq_len

    @property
    def grad_accum_steps(self) -> int:
        return self.settings.grad_accum_steps

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.settings.tokens_per_micro_batch

    @property
    def forward_flops_per_token(self) -> float:
        return self.flops.forward / self.tokens_per_micro_batch

    @property
    def train_flops_per_token(self) -> float:
        return self.flops.train / self.tokens_per_micro_batch

    @property
    def train_flops_per_step(self) -> float:
        return self.flops.train * self.grad_accum_steps

    @property
    def adapter_flops_share(self) -> float:
        """Share of the training FLOPs spent in adapter matmuls (and method overheads)."""
        return self.flops.adapter / self.flops.train if self.flops.train else 0.0

    @property
    def memory_bytes(self) -> float:
        return self.memory.total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures; ``settings`` holds the resolved ``activation_dtype``.

        ``CostSettings(**to_dict()["settings"])`` and ``CostTerms(**to_dict()["cost_terms"])``
        price the same costs again.
        """
        tokens = self.tokens_per_micro_batch
        return {
            "architecture": self.architecture,
            "cost_terms": asdict(self.terms),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "grad_accum_steps": self.grad_accum_steps,
            "trainable_params": self.trainable_params,
            "effective_trainable_params": self.effective_trainable_params,
            "rank_total": self.rank_total,
            "effective_rank_total": self.effective_rank_total,
            "adapted_modules": self.adapted_modules,
            "lowest_adapted_layer": self.lowest_adapted_layer,
            "forward_flops_per_token": self.forward_flops_per_token,
            "train_flops_per_token": self.train_flops_per_token,
            "train_flops_per_step": self.train_flops_per_step,
            "adapter_flops_share": self.adapter_flops_share,
            "flops_per_token_breakdown": {
                "forward_base": self.flops.forward_base / tokens,
                "forward_adapter": self.flops.forward_adapter / tokens,
                "backward_base": self.flops.backward_base / tokens,
                "backward_adapter": self.flops.backward_adapter / tokens,
                "recompute": self.flops.recompute / tokens,
            },
            "memory_bytes": round(self.memory_bytes),
            "memory_breakdown": self.memory.as_dict(),
            "settings": {
                **asdict(self.settings),
                "activation_dtype": self.settings.resolved_activation_dtype,
            },
        }

    def relative_to(self, reference: CostReport) -> dict[str, float]:
        """Ratios ``self / reference`` (e.g. against uniform LoRA): what STRATO's reward penalises.

        Keys: ``params``, ``train_flops`` (per token), ``forward_flops`` (per
        token) and ``memory``. A ratio of 0.7 on ``params`` or 0.8 on
        ``train_flops`` is the product spec's efficiency win.
        """

        def ratio(a: float, b: float) -> float:
            return a / b if b else float("inf") if a else 1.0

        return {
            "params": ratio(self.trainable_params, reference.trainable_params),
            "train_flops": ratio(self.train_flops_per_token, reference.train_flops_per_token),
            "forward_flops": ratio(self.forward_flops_per_token, reference.forward_flops_per_token),
            "memory": ratio(self.memory_bytes, reference.memory_bytes),
        }


def estimate_costs(
    arch: Architecture,
    allocation: Mapping[str, int],
    terms: CostTerms = PLAIN_LORA,
    settings: CostSettings = DEFAULT_SETTINGS,
    *,
    effective_ranks: Mapping[str, int] | None = None,
) -> CostReport:
    """Price one allocation: trainable params, FLOPs (:mod:`.flops`) and memory (:mod:`.memory`).

    ``effective_ranks`` (AdaLoRA): ranks its masks keep, from
    :func:`adalora_effective_ranks`; reported as ``effective_trainable_params``
    while costs follow the allocated ranks, which the masked model still computes.
    """
    params = trainable_params(arch, allocation, terms)
    resolved = resolve_allocation(arch, allocation)
    effective = None
    if effective_ranks is not None:
        effective = trainable_params(arch, effective_ranks, terms)
    return CostReport(
        architecture=arch.name,
        terms=terms,
        settings=settings,
        trainable_params=params,
        adapted_modules=len(resolved),
        lowest_adapted_layer=lowest_adapted_layer(arch, allocation),
        flops=training_flops(arch, allocation, terms, settings),
        memory=memory_estimate(arch, allocation, terms, params, settings),
        effective_trainable_params=effective,
        rank_total=sum(rank for _, rank in resolved),
        effective_rank_total=(
            None if effective_ranks is None else sum(int(r) for r in effective_ranks.values())
        ),
    )


def estimate_costs_for_peft_model(
    peft_model: Any, settings: CostSettings = DEFAULT_SETTINGS, adapter_name: str = "default"
) -> tuple[CostReport, Allocation]:
    """:func:`estimate_costs` for an instantiated peft model (meta device is fine).

    Architecture, allocation and cost terms (:func:`cost_terms_of_peft_model`) are
    read from the model, and so are, with singular values (AdaLoRA), the ranks its
    masks keep. The adapter's own ``lora_dropout`` replaces ``settings.lora_dropout``:
    it is what the model will run.
    """
    arch = Architecture.from_hf_config(peft_model.get_base_model().config)
    allocation = allocation_from_peft_model(peft_model, adapter_name)
    terms = cost_terms_of_peft_model(peft_model, adapter_name)
    config = peft_model.peft_config[adapter_name]
    settings = replace(settings, lora_dropout=float(getattr(config, "lora_dropout", 0.0) or 0.0))
    effective = adalora_effective_ranks(peft_model, adapter_name) if terms.singular_values else None
    report = estimate_costs(arch, allocation, terms, settings, effective_ranks=effective)
    return report, allocation
