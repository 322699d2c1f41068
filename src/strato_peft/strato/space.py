"""The search space: slots (layer x module type), a rank menu, costs and the hard budget.

An allocation is a tuple of menu indices, one per slot, in the space's slot order; as a
``dict`` (module name -> rank, rank > 0 only) it is exactly ``peft``'s ``rank_pattern``
and the cost model's :data:`~strato_peft.costs.Allocation`. Costs come from
:mod:`strato_peft.costs` and are normalised by the reference LoRA (1.0 = its cost).

Trainable params are additive over slots and exact. Training FLOPs are not additive
(the backward pass reaches down to the lowest adapted layer), so they are priced by
the cost model itself; for one slot the FLOPs are affine in its rank once the rest of
the allocation is fixed, which lets the budget mask price all ranks of a slot with two
calls (:meth:`SearchSpace.feasible_ranks`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from strato_peft import costs
from strato_peft.costs import Allocation, Architecture, Slot

COST_NAMES = ("params", "flops", "memory")


def allocation_hash(allocation: Mapping[str, int]) -> str:
    """Canonical hash of an allocation: sorted ``name=rank`` pairs, rank 0 dropped."""
    items = sorted((name, int(rank)) for name, rank in allocation.items() if rank)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:20]


@dataclass
class SearchSpace:
    """Slots, menu, reference costs and budget of one search (see the module docstring).

    Allocations are priced as plain LoRA (``costs.PLAIN_LORA``) with fp32 weights and
    adapters on ``batch_size x seq_len`` tokens: :attr:`cost_settings`, built once from
    the fields like the reference report.
    """

    arch: Architecture
    slots: list[Slot]
    rank_menu: list[int]
    reference: Allocation
    budget: dict[str, float | None]
    cost_weights: dict[str, float]
    batch_size: int = 1
    seq_len: int = 256
    lora_dropout: float = 0.0
    cost_settings: costs.CostSettings = field(init=False, repr=False)
    _ref: costs.CostReport = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if 0 not in self.rank_menu:
            raise ValueError("peft.strato.rank_menu must contain 0 (no adapter)")
        if not self.slots:
            raise ValueError("the search space has no slots (check peft.strato.module_types)")
        self.cost_settings = costs.CostSettings(
            batch_size=self.batch_size, seq_len=self.seq_len, lora_dropout=self.lora_dropout,
            weight_dtype="fp32", adapter_dtype="fp32",
        )  # fmt: skip
        # FLOPs per token do not depend on the batch for LoRA: price one sequence
        self._flops_settings = replace(self.cost_settings, batch_size=1)
        self._ref = self.report(self.reference)
        self._flops_cache: dict[tuple[tuple[int, int], ...], float] = {}
        self._slot_params = [s.d_in + s.d_out for s in self.slots]
        if not self.feasible([0] * len(self.slots)):
            # the frozen model's forward (and the loss) cost FLOPs even with no adapter
            empty = self.fractions([0] * len(self.slots), memory=False)
            raise ValueError(
                f"budget {self.budget} is below the cost of the model with no adapter "
                f"({empty['flops']:.3f}x the reference's training FLOPs): no allocation fits"
            )

    # -- conversions -------------------------------------------------------------------
    def to_dict(self, ranks: Sequence[int]) -> Allocation:
        """Ranks per slot (in slot order) -> ``{module name: rank}`` for rank > 0."""
        return {s.name: int(r) for s, r in zip(self.slots, ranks, strict=True) if r}

    def to_ranks(self, allocation: Mapping[str, int]) -> list[int]:
        index = {s.name: i for i, s in enumerate(self.slots)}
        ranks = [0] * len(self.slots)
        for name, rank in allocation.items():
            if rank and name not in index:
                raise ValueError(f"allocation names {name!r}, which is not a slot of the search")
            if rank and rank not in self.rank_menu:
                raise ValueError(f"allocation gives {name!r} rank {rank}, not in the rank menu")
            if rank:
                ranks[index[name]] = int(rank)
        return ranks

    # -- costs -------------------------------------------------------------------------
    def report(self, allocation: Mapping[str, int]) -> costs.CostReport:
        """The cost model's full report of ``allocation`` under :attr:`cost_settings`."""
        return costs.estimate_costs(self.arch, allocation, costs.PLAIN_LORA, self.cost_settings)

    @property
    def reference_report(self) -> costs.CostReport:
        return self._ref

    def params(self, ranks: Sequence[int]) -> int:
        return sum(r * p for r, p in zip(ranks, self._slot_params, strict=True))

    def flops(self, ranks: Sequence[int]) -> float:
        """Training FLOPs per token (cost model), cached by allocation."""
        key = tuple((i, r) for i, r in enumerate(ranks) if r)
        if key not in self._flops_cache:
            if len(self._flops_cache) > 200_000:
                self._flops_cache.clear()
            report = costs.training_flops(
                self.arch, self.to_dict(ranks), costs.PLAIN_LORA, self._flops_settings
            )
            self._flops_cache[key] = report.train / self.seq_len
        return self._flops_cache[key]

    def fractions(self, ranks: Sequence[int], memory: bool | None = None) -> dict[str, float]:
        """Costs relative to the reference: ``params``, ``flops`` and (if asked) ``memory``."""
        ref = self._ref
        out = {
            "params": self.params(ranks) / ref.trainable_params,
            "flops": self.flops(ranks) / ref.train_flops_per_token,
        }
        if memory if memory is not None else self.cost_weights.get("memory", 0.0) > 0:
            out["memory"] = self.report(self.to_dict(ranks)).memory_bytes / ref.memory_bytes
        return out

    def normalised_cost(self, ranks: Sequence[int]) -> float:
        """Weighted mean of the cost fractions: what lambda multiplies in the reward."""
        fractions = self.fractions(ranks)
        total = sum(self.cost_weights.values())
        return sum(w * fractions[k] for k, w in self.cost_weights.items() if w) / total

    def feasible(self, ranks: Sequence[int]) -> bool:
        fractions = self.fractions(ranks, memory=self.budget.get("memory") is not None)
        return all(fractions[k] <= cap + 1e-12 for k, cap in self.budget.items() if cap)

    def feasible_ranks(self, ranks: Sequence[int], slot: int) -> list[bool]:
        """Mask over the menu for ``slot`` given the other slots' ranks (0 is always allowed
        when the rest is feasible: costs only grow with rank)."""
        ref = self._ref
        base = list(ranks)
        base[slot] = 0
        params_cap = self.budget.get("params")
        flops_cap = self.budget.get("flops")
        params0 = self.params(base)
        flops_of: dict[int, float] = {}
        if flops_cap:
            # affine in this slot's rank once the others are fixed: price two ranks
            flops_of[0] = self.flops(base)
            r1 = min((r for r in self.rank_menu if r), default=0)
            if r1:
                base[slot] = r1
                f1 = self.flops(base)
                base[slot] = r1 + 1
                slope = self.flops(base) - f1
                for rank in self.rank_menu:
                    if rank:
                        flops_of[rank] = f1 + (rank - r1) * slope
        mask = []
        for rank in self.rank_menu:
            ok = True
            if params_cap:
                params = params0 + rank * self._slot_params[slot]
                ok = params / ref.trainable_params <= params_cap + 1e-12
            if ok and flops_cap:
                ok = flops_of[rank] / ref.train_flops_per_token <= flops_cap + 1e-12
            mask.append(ok)
        return mask

    def describe(self) -> dict[str, Any]:
        ref = self._ref
        return {
            "slots": len(self.slots),
            "module_types": sorted({s.module_type for s in self.slots}),
            "rank_menu": list(self.rank_menu),
            "reference": {
                "trainable_params": ref.trainable_params,
                "train_flops_per_token": ref.train_flops_per_token,
                "memory_bytes": ref.memory_bytes,
            },
            "budget": dict(self.budget),
            "cost_weights": dict(self.cost_weights),
            "seq_len": self.seq_len,
        }


def build_space(
    arch: Architecture,
    settings: Any,
    *,
    reference_rank: int,
    reference_modules: Sequence[str],
    batch_size: int,
    seq_len: int,
    lora_dropout: float,
) -> SearchSpace:
    """The space for ``peft.strato`` settings on ``arch``."""
    unknown = [m for m in settings.module_types if m not in costs.MODULE_TYPES]
    if unknown:
        raise ValueError(
            f"peft.strato.module_types: unknown {unknown}; known: {', '.join(costs.MODULE_TYPES)}"
        )
    missing = [m for m in reference_modules if m not in settings.module_types]
    if missing or reference_rank not in settings.rank_menu:
        # the search anchors its scores on a real evaluation of the reference: it must be
        # an allocation of the space
        raise ValueError(
            f"the reference (rank {reference_rank} on {list(reference_modules)}) is not in the "
            f"search space: rank_menu {list(settings.rank_menu)}, module_types "
            f"{list(settings.module_types)}"
        )
    slots = costs.adaptable_slots(arch, tuple(settings.module_types))
    reference = costs.uniform_allocation(arch, reference_rank, reference_modules)
    budget = {"params": settings.budget.params, "flops": settings.budget.flops}
    return SearchSpace(
        arch=arch,
        slots=slots,
        rank_menu=list(settings.rank_menu),
        reference=reference,
        budget=budget,
        cost_weights=settings.cost_weights.model_dump(),
        batch_size=batch_size,
        seq_len=seq_len,
        lora_dropout=lora_dropout,
    )
