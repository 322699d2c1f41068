"""The structured search space: a handful of decisions instead of a rank per slot.

An allocation is decided in ``1 + T`` steps: the lowest adapted layer (a fraction of
the depth, from ``search.depth_fractions``, so one config serves 30 and 40 layers), then
one rank per module type (from ``rank_menu``, 0 = the type gets no adapter). Every layer
from the lowest one up gets the chosen rank on every chosen type. This is the space in
which published results say a win is possible: more module types at a lower rank (the
LoRA paper's Table 5; "LoRA Without Regret", 2025) and a top band of layers, the one
lever on training FLOPs (the backward stops at the lowest adapted layer). It contains
the hand rule ``band`` (every type, one rank, from a layer up) and uniform q,v LoRA.

The hard caps on params and FLOPs are enforced by masking, as in the per-slot space:
the option of a decision is allowed when the allocation with every later type at rank 0
is within the caps; costs only grow with rank and depth, so every episode is feasible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from strato_peft.costs import MODULE_TYPES
from strato_peft.strato.space import SearchSpace


@dataclass
class StructuredSpace:
    """Decisions over a per-slot :class:`SearchSpace` (see the module docstring)."""

    space: SearchSpace
    depth_fractions: list[float]

    def __post_init__(self) -> None:
        present = {s.module_type for s in self.space.slots}
        self.types = [t for t in MODULE_TYPES if t in present]
        self.n_layers = max(s.layer for s in self.space.slots) + 1
        lows = sorted(
            {min(self.n_layers - 1, round(f * self.n_layers)) for f in self.depth_fractions}
        )
        self.lowest_layers = lows
        self.rank_menu = list(self.space.rank_menu)
        self.options = [len(lows)] + [len(self.rank_menu)] * len(self.types)
        self._zero = self.rank_menu.index(0)

    @property
    def n_decisions(self) -> int:
        return len(self.options)

    def ranks(self, choice: Sequence[int]) -> list[int]:
        """Per-slot ranks of a full or partial choice (missing decisions: rank 0)."""
        if not choice:
            return [0] * len(self.space.slots)
        low = self.lowest_layers[choice[0]]
        by_type = {
            t: self.rank_menu[choice[1 + i]] if 1 + i < len(choice) else 0
            for i, t in enumerate(self.types)
        }
        return [by_type[s.module_type] if s.layer >= low else 0 for s in self.space.slots]

    def describe(self, choice: Sequence[int]) -> dict[str, Any]:
        ranks = {t: self.rank_menu[choice[1 + i]] for i, t in enumerate(self.types)}
        return {"lowest_layer": self.lowest_layers[choice[0]], "ranks": ranks}

    def feasible_options(self, prefix: Sequence[int]) -> list[bool]:
        """Mask over the options of the next decision after ``prefix``."""
        step = len(prefix)
        mask = []
        for option in range(self.options[step]):
            choice = [*prefix, option] + [self._zero] * (self.n_decisions - step - 1)
            mask.append(self.space.feasible(self.ranks(choice)))
        return mask

    def random_choice(self, rng: random.Random) -> list[int]:
        """A random feasible choice: each decision uniform over its feasible options."""
        choice: list[int] = []
        for _ in range(self.n_decisions):
            mask = self.feasible_options(choice)
            choice.append(rng.choice([i for i, ok in enumerate(mask) if ok]))
        return choice

    def choice_of(self, lowest_layer: int, ranks: dict[str, int]) -> list[int]:
        """The choice for a band (``lowest_layer``) and per-type ranks on the menu."""
        low = max(i for i, layer in enumerate(self.lowest_layers) if layer <= lowest_layer)
        return [low] + [self.rank_menu.index(ranks.get(t, 0)) for t in self.types]


class StructuredEnv(gym.Env[np.ndarray, np.int64]):
    """One episode = the ``1 + T`` decisions; the return is the objective of the result.

    ``objective(ranks)`` (the surrogate's score minus ``lambda x`` normalised cost) is paid
    at the last step; episodes are a handful of steps long, so PPO learns from the return
    directly. :meth:`action_masks` is what ``sb3-contrib``'s ``MaskablePPO`` reads.
    """

    def __init__(self, structured: StructuredSpace, objective: Any) -> None:
        super().__init__()
        self.metadata = {"render_modes": []}
        self.structured = structured
        self.objective = objective
        n = structured.n_decisions
        self.width = max(structured.options)
        self.action_space = gym.spaces.Discrete(self.width)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2 * n + 2,), np.float32)
        self.choice: list[int] = []

    def _obs(self) -> np.ndarray:
        s = self.structured
        n = s.n_decisions
        obs = np.zeros(2 * n + 2, dtype=np.float32)
        if len(self.choice) < n:
            obs[len(self.choice)] = 1.0
        for i, option in enumerate(self.choice):
            obs[n + i] = (option + 1) / s.options[i]
        fractions = s.space.fractions(s.ranks(self.choice), memory=False)
        obs[-2], obs[-1] = fractions["params"], fractions["flops"]
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.choice = []
        return self._obs(), {}

    def action_masks(self) -> np.ndarray:
        mask = np.zeros(self.width, dtype=bool)
        if len(self.choice) < self.structured.n_decisions:
            allowed = self.structured.feasible_options(self.choice)
            mask[: len(allowed)] = allowed
        else:
            mask[0] = True
        return mask

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        index = int(action)
        if not self.action_masks()[index]:
            raise ValueError(f"action {index} is masked at decision {len(self.choice)}")
        self.choice.append(index)
        done = len(self.choice) == self.structured.n_decisions
        reward = float(self.objective(self.structured.ranks(self.choice))) if done else 0.0
        info = {"choice": list(self.choice)} if done else {}
        return self._obs(), reward, done, False, info


def build_structured_policy(envs: list[StructuredEnv], seed: int, n_steps: int = 64) -> Any:
    """MaskablePPO (sb3-contrib) for the structured environment (a few thousand params)."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    vec = DummyVecEnv([lambda env=env: env for env in envs])  # type: ignore[misc]
    return MaskablePPO(
        "MlpPolicy",
        vec,
        n_steps=n_steps,
        batch_size=min(64, n_steps * len(envs)),
        n_epochs=8,
        gamma=1.0,
        gae_lambda=1.0,
        ent_coef=0.01,
        learning_rate=3e-3,
        policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}},
        seed=seed,
        device="cpu",
        verbose=0,
    )


def sample_choices(
    env: StructuredEnv, policy: Any, count: int, deterministic: bool = False
) -> list[list[int]]:
    """``count`` policy episodes on copies of ``env`` (batched: one forward per decision)."""
    import copy

    import torch

    envs = [copy.copy(env) for _ in range(count)]
    obs = np.stack([e.reset()[0] for e in envs])
    with torch.no_grad():
        for _ in range(env.structured.n_decisions):
            masks = np.stack([e.action_masks() for e in envs])
            dist = policy.policy.get_distribution(
                torch.as_tensor(obs, dtype=torch.float32), action_masks=masks
            )
            actions = dist.get_actions(deterministic=deterministic).cpu().numpy()
            obs = np.stack([e.step(int(a))[0] for e, a in zip(envs, actions, strict=True)])
    return [list(e.choice) for e in envs]
