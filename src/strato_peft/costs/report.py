"""One call that prices an allocation: params, FLOPs and memory in a :class:`CostReport`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from strato_peft.costs.allocation import (
    Allocation,
    adalora_effective_ranks,
    allocation_from_peft_model,
    lowest_adapted_layer,
    method_of_peft_model,
    resolve_allocation,
)
from strato_peft.costs.architecture import Architecture
from strato_peft.costs.flops import FlopCount, check_method, training_flops
from strato_peft.costs.memory import MemoryEstimate, memory_estimate


def trainable_params(
    arch: Architecture, allocation: Mapping[str, int], method: str = "lora"
) -> int:
    """Trainable parameters of the adapters; equals ``sum(p.numel())`` over peft's trainable params.

    Per adapted module of shape ``d_in -> d_out`` with rank ``r``:
    LoRA ``r (d_in + d_out)`` (``A``: ``r x d_in``, ``B``: ``d_out x r``);
    DoRA adds the magnitude vector, ``+ d_out``;
    AdaLoRA adds the singular values ``E``, ``+ r`` (``r`` = allocated rank).
    """
    check_method(method)
    total = 0
    for slot, rank in resolve_allocation(arch, allocation):
        total += rank * (slot.d_in + slot.d_out)
        if method == "dora":
            total += slot.d_out
        elif method == "adalora":
            total += rank
    return total


@dataclass(frozen=True)
class CostReport:
    """Costs of training one allocation; ``to_dict()`` is the JSON of the dry run and run folder.

    Per-token figures are per trained token of a micro-batch (per-call terms
    such as DoRA's norm amortised over its ``batch_size x seq_len`` tokens);
    a step is one optimizer step, ``grad_accum_steps`` micro-batches.
    """

    architecture: str
    method: str
    batch_size: int
    seq_len: int
    grad_accum_steps: int
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
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.batch_size * self.seq_len

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
        tokens = self.tokens_per_micro_batch
        return {
            "architecture": self.architecture,
            "method": self.method,
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
            "settings": dict(self.settings),
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
    method: str = "lora",
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    grad_accum_steps: int = 1,
    weight_dtype: str = "bf16",
    activation_dtype: str | None = None,
    adapter_dtype: str = "fp32",
    optimizer: str = "adamw",
    lora_dropout: float = 0.0,
    gradient_checkpointing: bool = False,
    input_requires_grad: bool = False,
    attn_implementation: str = "eager",
    adalora_orth_reg: bool = True,
    effective_ranks: Mapping[str, int] | None = None,
) -> CostReport:
    """Price one allocation: trainable params, FLOPs (:mod:`.flops`) and memory (:mod:`.memory`).

    ``effective_ranks`` (AdaLoRA): ranks its masks keep, from
    :func:`adalora_effective_ranks`; reported as ``effective_trainable_params``
    while costs follow the allocated ranks, which the masked model still computes.
    """
    check_method(method)
    params = trainable_params(arch, allocation, method)
    flops = training_flops(
        arch,
        allocation,
        method,
        batch_size=batch_size,
        seq_len=seq_len,
        lora_dropout=lora_dropout,
        gradient_checkpointing=gradient_checkpointing,
        input_requires_grad=input_requires_grad,
        adalora_orth_reg=adalora_orth_reg,
    )
    memory = memory_estimate(
        arch,
        allocation,
        method,
        params,
        batch_size=batch_size,
        seq_len=seq_len,
        weight_dtype=weight_dtype,
        activation_dtype=activation_dtype,
        adapter_dtype=adapter_dtype,
        optimizer=optimizer,
        lora_dropout=lora_dropout,
        gradient_checkpointing=gradient_checkpointing,
        input_requires_grad=input_requires_grad,
        attn_implementation=attn_implementation,
    )
    effective = None
    if effective_ranks is not None:
        effective = trainable_params(arch, effective_ranks, method)
    settings = {
        "weight_dtype": weight_dtype,
        "activation_dtype": activation_dtype or weight_dtype,
        "adapter_dtype": adapter_dtype,
        "optimizer": optimizer,
        "lora_dropout": lora_dropout,
        "gradient_checkpointing": gradient_checkpointing,
        "input_requires_grad": input_requires_grad,
        "attn_implementation": attn_implementation,
    }
    return CostReport(
        architecture=arch.name,
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        grad_accum_steps=grad_accum_steps,
        trainable_params=params,
        adapted_modules=len(resolve_allocation(arch, allocation)),
        lowest_adapted_layer=lowest_adapted_layer(arch, allocation),
        flops=flops,
        memory=memory,
        effective_trainable_params=effective,
        rank_total=sum(rank for _, rank in resolve_allocation(arch, allocation)),
        effective_rank_total=(
            None if effective_ranks is None else sum(int(r) for r in effective_ranks.values())
        ),
        settings=settings,
    )


def estimate_costs_for_peft_model(
    peft_model: Any, adapter_name: str = "default", **kwargs: Any
) -> tuple[CostReport, Allocation]:
    """:func:`estimate_costs` for an instantiated peft model (meta device is fine).

    Architecture, allocation, method, dropout and (AdaLoRA) effective ranks are
    read from the model; ``kwargs`` go to :func:`estimate_costs`.
    """
    arch = Architecture.from_hf_config(peft_model.get_base_model().config)
    allocation = allocation_from_peft_model(peft_model, adapter_name)
    method = method_of_peft_model(peft_model, adapter_name)
    config = peft_model.peft_config[adapter_name]
    kwargs.setdefault("lora_dropout", float(getattr(config, "lora_dropout", 0.0) or 0.0))
    if method == "adalora":
        kwargs.setdefault("effective_ranks", adalora_effective_ranks(peft_model, adapter_name))
        # a bare PeftModel calls the base model directly and skips AdaLoraModel.forward
        kwargs.setdefault("adalora_orth_reg", type(peft_model).__name__ != "PeftModel")
    return estimate_costs(arch, allocation, method, **kwargs), allocation
