"""Allocations: which module gets an adapter of which rank.

An allocation is a plain ``dict[str, int]`` from the module's name in the Hugging
Face model (``model.layers.{i}.self_attn.q_proj``) to its rank; a missing name
or rank 0 means no adapter. That is exactly the shape of ``peft``'s
``rank_pattern``, and what STRATO's search writes to ``allocation.json``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from strato_peft.costs.architecture import MODULE_TYPES, Architecture, Slot, adaptable_slots

Allocation = dict[str, int]

_NAME = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def parse_module_name(name: str) -> tuple[int, str]:
    """``"...model.layers.3.mlp.up_proj"`` -> ``(3, "up_proj")``; accepts peft's prefixed names."""
    match = _NAME.search(name)
    if match is None or match.group(3) not in MODULE_TYPES:
        raise ValueError(
            f"{name!r} is not an adaptable Llama module name "
            "(expected model.layers.<i>.self_attn.{q,k,v,o}_proj or model.layers.<i>.mlp.{gate,up,down}_proj)"
        )
    return int(match.group(1)), match.group(3)


def resolve_allocation(arch: Architecture, allocation: Mapping[str, int]) -> list[tuple[Slot, int]]:
    """The adapted slots of an allocation with their ranks (rank > 0 only), validated against ``arch``."""
    resolved: list[tuple[Slot, int]] = []
    for name, rank in allocation.items():
        layer, module_type = parse_module_name(name)
        if not 0 <= layer < arch.num_hidden_layers:
            raise ValueError(f"{name!r}: layer {layer} outside 0..{arch.num_hidden_layers - 1}")
        if rank < 0:
            raise ValueError(f"{name!r}: negative rank {rank}")
        if rank:
            resolved.append((Slot(layer, module_type, *arch.module_shape(module_type)), int(rank)))
    return resolved


def uniform_allocation(
    arch: Architecture,
    rank: int,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    layers: Iterable[int] | None = None,
) -> Allocation:
    """The same ``rank`` on every ``target_modules`` slot of ``layers`` (default: all layers): plain LoRA."""
    chosen = None if layers is None else list(layers)
    return {slot.name: rank for slot in adaptable_slots(arch, tuple(target_modules), chosen)}


def upper_layers(arch: Architecture, fraction: float = 0.5) -> range:
    """The top ``fraction`` of the decoder layers, e.g. layers 16..31 of a 32-layer model for 0.5."""
    count = round(arch.num_hidden_layers * fraction)
    return range(arch.num_hidden_layers - count, arch.num_hidden_layers)


def lowest_adapted_layer(arch: Architecture, allocation: Mapping[str, int]) -> int | None:
    """Index of the lowest layer holding an adapter; ``None`` for an empty allocation."""
    layers = [slot.layer for slot, _ in resolve_allocation(arch, allocation)]
    return min(layers) if layers else None


def _peft_adapter_modules(peft_model: Any, adapter_name: str) -> Iterable[tuple[str, Any]]:
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and hasattr(lora_a, "keys") and adapter_name in lora_a:
            yield name, module


def allocation_from_peft_model(peft_model: Any, adapter_name: str = "default") -> Allocation:
    """Module name -> allocated rank, read from the shapes of an instantiated peft model.

    Reads ``lora_A[adapter].shape[0]`` (LoRA, DoRA: ``nn.Linear``; AdaLoRA: a
    ``Parameter``), so it works on the meta device too. For AdaLoRA this is the
    *allocated* rank (``init_r`` or its ``rank_pattern``); see
    :func:`adalora_effective_ranks` for the ranks its masks keep.
    """
    allocation: Allocation = {}
    for name, module in _peft_adapter_modules(peft_model, adapter_name):
        weight = module.lora_A[adapter_name]
        weight = getattr(weight, "weight", weight)
        layer, module_type = parse_module_name(name)
        block = "self_attn" if module_type in MODULE_TYPES[:4] else "mlp"
        allocation[f"model.layers.{layer}.{block}.{module_type}"] = int(weight.shape[0])
    return allocation


def adalora_effective_ranks(peft_model: Any, adapter_name: str = "default") -> Allocation:
    """Module name -> rank AdaLoRA's budget keeps (its mask), or the allocated rank before masking.

    AdaLoRA (Zhang et al. 2023, arXiv:2303.10512) prunes singular values by
    zeroing entries of ``lora_E`` and records the kept ones in
    ``peft_config.rank_pattern`` (``"<module>.lora_E.<adapter>" -> [bool] * r``).
    The masked triplets still occupy memory and FLOPs, so costs use the
    allocated rank and report this effective rank next to it.
    """
    ranks = allocation_from_peft_model(peft_model, adapter_name)
    pattern = getattr(peft_model.peft_config[adapter_name], "rank_pattern", None) or {}
    for key, mask in pattern.items():
        layer, module_type = parse_module_name(key.split(".lora_E")[0])
        block = "self_attn" if module_type in MODULE_TYPES[:4] else "mlp"
        name = f"model.layers.{layer}.{block}.{module_type}"
        if name in ranks:
            ranks[name] = int(sum(bool(kept) for kept in mask))
    return ranks
