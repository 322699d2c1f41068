"""Controls for every STRATO claim, matched on cost (``peft.strato.control``).

* ``uniform``: LoRA on the reference's module types in every layer at the target's
  params (the found allocation's, or the params budget's): rank ``r`` and, from the top
  layer down, ``r + 1`` on as many modules as bring the params closest;
* ``band``: the hand rule, the strongest simple rule we know: every allowed module type
  from the found allocation's lowest layer up, at one rank (per-type ranks ``r`` or
  ``r + 1`` where one rank cannot match) chosen so that its params match the found
  allocation's; the same lowest layer gives the same FLOPs;
* ``random``: a random allocation of the structured space under the same caps, drawn
  until its params and FLOPs are both within 5% of the found allocation's;
* ``random-search`` is not here: it is the whole search with random proposals.

Each returns the allocation and a summary of what it matched and how closely.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Any

from strato_peft.costs import trainable_params, uniform_allocation
from strato_peft.strato.space import SearchSpace
from strato_peft.strato.structured import StructuredSpace

MATCH_TOLERANCE = 0.05


def cost_fractions(space: SearchSpace, allocation: Mapping[str, int]) -> dict[str, float]:
    """Params, training FLOPs and memory of ``allocation`` relative to the reference (any
    ranks, not only the menu's)."""
    ref = space.reference_report
    report = space.report(allocation)
    return {
        "params": report.trainable_params / ref.trainable_params,
        "flops": report.train_flops_per_token / ref.train_flops_per_token,
        "memory": report.memory_bytes / ref.memory_bytes,
    }


def _deviation(
    space: SearchSpace, allocation: Mapping[str, int], target: Mapping[str, int]
) -> dict[str, float]:
    mine, theirs = cost_fractions(space, allocation), cost_fractions(space, target)
    return {k: mine[k] / theirs[k] - 1.0 for k in ("params", "flops")}


def uniform(
    space: SearchSpace, modules: Sequence[str], target_params: int, origin: str
) -> tuple[dict[str, int], dict[str, Any]]:
    """LoRA on ``modules`` in every layer with ``target_params`` params: rank ``r`` with
    ``r + 1`` on enough modules (from the top layer down) that the params come closest,
    since one integer rank on q,v can miss the target by more than 5%."""
    base = uniform_allocation(space.arch, 1, modules)
    rank = max(1, int(target_params // trainable_params(space.arch, base)))
    allocation = {name: rank for name in base}
    units = {name: trainable_params(space.arch, {name: 1}) for name in base}
    order = sorted(base, key=lambda n: (-costs_layer(n), n))
    params = trainable_params(space.arch, allocation)
    for name in order:
        if abs(params + units[name] - target_params) >= abs(params - target_params):
            break
        allocation[name] += 1
        params += units[name]
    summary = {
        "kind": "uniform", "target_params": target_params, "rank": rank,
        "modules_at_rank_plus_one": sum(1 for r in allocation.values() if r > rank),
        "target_from": origin, "deviation": {"params": params / target_params - 1.0},
    }  # fmt: skip
    return allocation, summary


def costs_layer(name: str) -> int:
    from strato_peft.costs import parse_module_name

    return parse_module_name(name)[0]


def band(
    space: SearchSpace, found: Mapping[str, int], module_types: Sequence[str]
) -> tuple[dict[str, int], dict[str, Any]]:
    """The hand rule matched on ``found``'s params and lowest layer (module docstring)."""
    lowest = min(slot.layer for slot in space.slots if found.get(slot.name))
    slots = [s for s in space.slots if s.layer >= lowest and s.module_type in module_types]
    types = sorted({s.module_type for s in slots})
    unit = {t: sum(s.d_in + s.d_out for s in slots if s.module_type == t) for t in types}
    target = trainable_params(space.arch, found)
    base = max(1, int(target // sum(unit.values())))
    best: tuple[float, dict[str, int]] | None = None
    for bumps in itertools.product((0, 1), repeat=len(types)):
        ranks = {t: base + b for t, b in zip(types, bumps, strict=True)}
        params = sum(ranks[t] * unit[t] for t in types)
        gap = abs(params / target - 1.0)
        if best is None or gap < best[0]:
            best = (gap, ranks)
    assert best is not None
    ranks = best[1]
    allocation = {s.name: ranks[s.module_type] for s in slots}
    summary = {
        "kind": "band", "lowest_layer": lowest, "ranks": ranks,
        "deviation": _deviation(space, allocation, found),
    }  # fmt: skip
    return allocation, summary


def random_matched(
    structured: StructuredSpace,
    found: Mapping[str, int] | None,
    seed: int,
    tries: int = 50_000,
) -> tuple[dict[str, int], dict[str, Any]]:
    """A random allocation of the structured space under its caps, within 5% of
    ``found``'s params and FLOPs (``found=None``: any feasible one).

    Rejection sampling of uniform choices: the params test is exact and cheap (additive
    over slots), so only draws that pass it are priced for FLOPs and the caps. The
    closest draw is kept when none of ``tries`` is within tolerance (and said so).
    """
    space = structured.space
    rng = random.Random(f"strato-random-{seed}")
    if found is None:
        choice = structured.random_choice(rng)
        summary = {"kind": "random", "seed": seed, "choice": structured.describe(choice)}
        return space.to_dict(structured.ranks(choice)), summary
    target = cost_fractions(space, found)
    best: tuple[float, list[int]] | None = None
    for _ in range(tries):
        choice = [rng.randrange(n) for n in structured.options]
        ranks = structured.ranks(choice)
        if not any(ranks):
            continue
        params_gap = abs(
            space.params(ranks) / space.reference_report.trainable_params / target["params"] - 1
        )
        if params_gap > MATCH_TOLERANCE and best is not None and params_gap >= best[0]:
            continue
        if not space.feasible(ranks):
            continue
        flops_gap = abs(space.fractions(ranks, memory=False)["flops"] / target["flops"] - 1)
        gap = max(params_gap, flops_gap)
        if best is None or gap < best[0]:
            best = (gap, choice)
        if gap <= MATCH_TOLERANCE:
            break
    if best is None:
        raise ValueError("no random allocation with an adapter fits the caps")
    gap, choice = best
    allocation = space.to_dict(structured.ranks(choice))
    summary = {
        "kind": "random", "seed": seed, "choice": structured.describe(choice),
        "deviation": _deviation(space, allocation, found), "within_tolerance": gap <= MATCH_TOLERANCE,
    }  # fmt: skip
    return allocation, summary
