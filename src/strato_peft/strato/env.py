"""The allocation environment: one episode fills the slots one at a time.

Slots are visited from the top layer down (the backward pass stops at the lowest
adapted layer, so deciding the top first lets the policy see how deep it is going).
The action is an index into the rank menu; :meth:`AllocationEnv.action_masks` (the
interface ``sb3-contrib``'s ``MaskablePPO`` reads) allows only ranks that keep the
partial allocation within the hard budget. Costs only grow with rank and rank 0 is
always allowed, so *every* episode ends in a feasible allocation.

Reward: with ``phi(ranks) = surrogate(ranks) - lambda x normalised_cost(ranks)``, each step
earns ``phi(after) - phi(before)``; the episode's return is ``phi(final)`` exactly
(``phi`` of the empty allocation is 0), i.e. the surrogate's estimate of the search
objective, delivered densely so that PPO learns from few episodes.

``reset(options={"start": ranks, "slots": [...]})`` returns to a given allocation (an
archive elite) and lets the policy re-decide only the listed slots: Go-Explore's
return-then-explore.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from strato_peft.costs import MODULE_TYPES
from strato_peft.strato.space import SearchSpace
from strato_peft.strato.surrogate import Surrogate

OBS_SIZE = 10 + len(MODULE_TYPES)


class AllocationEnv(gym.Env[np.ndarray, np.int64]):
    """See the module docstring."""

    def __init__(self, space: SearchSpace, surrogate: Surrogate, lam: float) -> None:
        super().__init__()
        self.metadata = {"render_modes": []}
        self.space = space
        self.surrogate = surrogate
        self.lam = lam
        n = len(space.slots)
        self.order = sorted(range(n), key=lambda i: (-space.slots[i].layer, i))
        self.action_space = gym.spaces.Discrete(len(space.rank_menu))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_SIZE,), np.float32)
        layers = max(s.layer for s in space.slots) or 1
        ref = space.reference_report
        width = max(s.d_in + s.d_out for s in space.slots)
        sens = np.asarray(surrogate.sensitivity, dtype=np.float64)
        self._static = np.zeros((n, 4 + len(MODULE_TYPES)), dtype=np.float32)
        for i, s in enumerate(space.slots):
            self._static[i, 0] = s.layer / layers
            self._static[i, 1] = (s.d_in + s.d_out) / width
            self._static[i, 2] = (s.d_in + s.d_out) * 16 / ref.trainable_params
            self._static[i, 3] = sens[i] / (sens.max() or 1.0)
            self._static[i, 4 + MODULE_TYPES.index(s.module_type)] = 1.0
        self.ranks: list[int] = [0] * n
        self.queue: list[int] = []
        self.position = 0
        self.phi = 0.0
        self._fractions: dict[str, float] = {"params": 0.0, "flops": 0.0}

    # -- helpers -------------------------------------------------------------------------
    def potential(self, ranks: Sequence[int]) -> float:
        if not any(ranks):
            return 0.0
        return self.surrogate.predict(ranks) - self.lam * self.space.normalised_cost(ranks)

    def _obs(self) -> np.ndarray:
        obs = np.zeros(OBS_SIZE, dtype=np.float32)
        if self.position < len(self.queue):
            slot = self.queue[self.position]
            obs[: self._static.shape[1]] = self._static[slot]
            obs[-5] = self.surrogate.slot_gain(slot, max(self.space.rank_menu))
        fractions = self._fractions
        obs[-6] = self.position / max(len(self.queue), 1)
        obs[-4] = fractions["params"]
        obs[-3] = fractions["flops"]
        caps = [c for c in self.space.budget.values() if c]
        used = (
            max(fractions.get(k, 0.0) / c for k, c in self.space.budget.items() if c) if caps else 0
        )
        obs[-2] = 1.0 - used
        obs[-1] = self.lam
        return obs

    # -- gymnasium API -------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        start = options.get("start")
        self.ranks = list(start) if start is not None else [0] * len(self.space.slots)
        chosen = options.get("slots")
        if chosen is not None:
            picked = set(chosen)
            self.queue = [i for i in self.order if i in picked]
            for i in self.queue:
                self.ranks[i] = 0
        else:
            self.queue = list(self.order)
        self.position = 0
        self.phi = self.potential(self.ranks)
        self._fractions = self.space.fractions(self.ranks, memory=False)
        return self._obs(), {}

    def action_masks(self) -> np.ndarray:
        if self.position >= len(self.queue):
            return np.ones(len(self.space.rank_menu), dtype=bool)
        slot = self.queue[self.position]
        return np.asarray(self.space.feasible_ranks(self.ranks, slot), dtype=bool)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        slot = self.queue[self.position]
        mask = self.action_masks()
        index = int(action)
        if not mask[index]:
            raise ValueError(f"action {index} is masked at slot {self.space.slots[slot].name}")
        self.ranks[slot] = self.space.rank_menu[index]
        self.position += 1
        before = self.phi
        if self.ranks[slot]:  # costs and potential change only when a rank is given
            self.phi = self.potential(self.ranks)
            self._fractions = self.space.fractions(self.ranks, memory=False)
        done = self.position >= len(self.queue)
        info = {"ranks": list(self.ranks)} if done else {}
        return self._obs(), float(self.phi - before), done, False, info
