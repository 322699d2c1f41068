"""The STRATO search loop: probe, anchor, then alternate policy learning and real evaluations.

1. **Probe** each slot's sensitivity on the task's training batches
   (:func:`~strato_peft.strato.evaluator.probe_sensitivity`).
2. **Anchors**: the base model's held-out loss (score 0) and one real evaluation of the
   reference LoRA (score 1): scores are normalised by them.
3. **Rounds** until the evaluation budget or the wall-time cap is spent: fit the
   surrogate to every real evaluation, train the MaskablePPO policy on the surrogate
   environment, propose candidates (policy episodes from scratch, or Go-Explore:
   return to a cost cell's elite and let the policy re-decide a few slots), and give
   the best *unseen* candidate (by surrogate objective) a real evaluation. A proposal
   already in the archive is logged as a cache hit and never evaluated again.
4. **Result**: the evaluated allocation with the best *real* objective,
   ``score - lambda x normalised cost``; ``allocation.json``, ``search.json`` and
   ``pareto.json`` are written atomically.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strato_peft.results import (
    ALLOCATION_FILE,
    PARETO_FILE,
    PARETO_PLOT,
    SEARCH_FILE,
    atomic_write_bytes,
    atomic_write_json,
)
from strato_peft.strato.archive import Evaluation, open_archive
from strato_peft.strato.env import AllocationEnv
from strato_peft.strato.evaluator import RealEvaluator, probe_sensitivity
from strato_peft.strato.space import SearchSpace, allocation_hash
from strato_peft.strato.surrogate import Surrogate

log = logging.getLogger(__name__)

MAX_POLICY_PARAMS = 500_000
"""The product spec: the STRATO controller adds at most 0.5M parameters."""


@dataclass
class SearchOutcome:
    allocation: dict[str, int]
    summary: dict[str, Any]
    winner_state: Path | None = None
    """The winner's stored training state (structured search), continued by the run."""


POLICY_ENVS = 8


def build_policy(envs: list[AllocationEnv], settings: Any, seed: int) -> Any:
    """MaskablePPO (sb3-contrib) with a small MLP; at most 0.5M parameters (checked).

    The environments step in lockstep (one batched policy forward per step for all).
    """
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    vec = DummyVecEnv([lambda env=env: env for env in envs])  # type: ignore[misc]
    n_steps = max(16, min(2048, settings.policy_timesteps) // len(envs))
    policy = MaskablePPO(
        "MlpPolicy",
        vec,
        n_steps=n_steps,
        batch_size=min(64, n_steps * len(envs)),
        n_epochs=4,
        gamma=1.0,
        gae_lambda=0.95,
        ent_coef=0.01,
        learning_rate=3e-4,
        policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}},
        seed=seed,
        device="cpu",
        verbose=0,
    )
    count = policy_parameter_count(policy)
    if count > MAX_POLICY_PARAMS:
        raise RuntimeError(
            f"the STRATO policy has {count:,} parameters (limit {MAX_POLICY_PARAMS:,})"
        )
    return policy


def policy_parameter_count(policy: Any) -> int:
    return sum(p.numel() for p in policy.policy.parameters())


def sample_episodes(
    env: AllocationEnv, policy: Any, count: int, options: list[dict[str, Any] | None]
) -> list[list[int]]:
    """``count`` stochastic policy episodes, batched: every step is one policy forward.

    Episodes run in lockstep on copies of ``env``; those given ``options`` (returns to an
    elite) must all re-decide the same number of slots, so they end together.
    """
    import copy

    import torch

    envs = [copy.copy(env) for _ in range(count)]
    obs = np.stack([e.reset(options=o)[0] for e, o in zip(envs, options, strict=True)])
    steps = len(envs[0].queue)
    with torch.no_grad():
        for _ in range(steps):
            masks = np.stack([e.action_masks() for e in envs])
            dist = policy.policy.get_distribution(
                torch.as_tensor(obs, dtype=torch.float32), action_masks=masks
            )
            actions = dist.get_actions(deterministic=False).cpu().numpy()
            obs = np.stack([e.step(int(a))[0] for e, a in zip(envs, actions, strict=True)])
    return [list(e.ranks) for e in envs]


def random_allocation(space: SearchSpace, rng: random.Random) -> list[int]:
    """A random feasible allocation: slots in random order, each a uniform feasible rank."""
    ranks = [0] * len(space.slots)
    order = list(range(len(space.slots)))
    rng.shuffle(order)
    for slot in order:
        mask = space.feasible_ranks(ranks, slot)
        ranks[slot] = rng.choice([r for r, ok in zip(space.rank_menu, mask, strict=True) if ok])
    return ranks


def pareto_front(points: Sequence[dict[str, Any]], cost_key: str) -> list[dict[str, Any]]:
    """Points not dominated in (higher ``score``, lower ``cost_key``), sorted by cost."""
    ordered = sorted(points, key=lambda p: (p[cost_key], -p["score"]))
    front: list[dict[str, Any]] = []
    best = -float("inf")
    for p in ordered:
        if p["score"] > best:
            front.append(p)
            best = p["score"]
    return front


class Search:
    """One STRATO search (see the module docstring)."""

    def __init__(
        self,
        space: SearchSpace,
        evaluator: RealEvaluator,
        settings: Any,
        folder: Path,
        *,
        seed: int,
        protocol: str,
        probe_batches: int | None = None,
        splits: dict[str, str] | None = None,
    ) -> None:
        self.space = space
        self.evaluator = evaluator
        self.settings = settings
        self.search = settings.search
        self.folder = folder
        self.seed = seed
        self.protocol = protocol
        self.splits = splits or {}
        self.lam = float(settings.lambda_)
        self.rng = random.Random(seed)
        self.archive = open_archive(self.search, folder, protocol)
        self.cache_hits: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.probe_batches = probe_batches or self.search.probe_batches
        self.base_loss = 0.0
        self.reference_loss = 0.0

    # -- scores --------------------------------------------------------------------------
    def score(self, loss: float) -> float:
        denom = self.base_loss - self.reference_loss
        if denom <= 1e-9:
            denom = max(abs(denom), 1e-3 * abs(self.base_loss), 1e-9)
        return (self.base_loss - loss) / denom

    def objective(self, e: Evaluation) -> float:
        ranks = self.space.to_ranks(e.allocation)
        return self.score(e.eval_loss) - self.lam * self.space.normalised_cost(ranks)

    def within_budget(self, e: Evaluation) -> bool:
        """A shared archive (``search.archive_path``) or a resumed one whose budget was
        changed can hold allocations over this run's budget: never return to or pick them."""
        return self.space.feasible(self.space.to_ranks(e.allocation))

    def _elite_objective(self, e: Evaluation) -> float:
        return self.objective(e) if self.within_budget(e) else -float("inf")

    # -- evaluations ---------------------------------------------------------------------
    def _evaluate(self, ranks: Sequence[int], source: str, candidate: bool = True) -> Evaluation:
        allocation = self.space.to_dict(ranks)
        key = allocation_hash(allocation)
        if key in self.archive:
            raise RuntimeError(f"allocation {key} would be evaluated twice")
        result = self.evaluator.evaluate(allocation)
        loss, wall = result.eval_loss, result.wall_time_s
        fractions = self.space.fractions(ranks, memory=True)
        report = self.space.report(allocation)
        evaluation = Evaluation(
            hash=key, allocation=allocation, eval_loss=loss, params=self.space.params(ranks),
            params_fraction=fractions["params"], flops_per_token=self.space.flops(ranks),
            flops_fraction=fractions["flops"], memory_bytes=report.memory_bytes,
            wall_time_s=wall, source=source, extra={"candidate": candidate},
        )  # fmt: skip
        self.archive.add(evaluation)
        log.info(
            "real evaluation %d (%s): loss %.4f, params %.3fx, flops %.3fx, %.1f s",
            len(self.archive), source, loss, fractions["params"], fractions["flops"], wall,
        )  # fmt: skip
        return evaluation

    def _anchor(self, ranks: Sequence[int]) -> Evaluation:
        key = allocation_hash(self.space.to_dict(ranks))
        found = self.archive.get(key)
        return found if found is not None else self._evaluate(ranks, "anchor", candidate=False)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> SearchOutcome:
        from rich.progress import Progress

        start = time.perf_counter()
        previous = {e.hash for e in self.archive.evaluations()}
        if previous:
            log.info("resuming the search: %d real evaluations in the archive", len(previous))
        sensitivity = probe_sensitivity(self.evaluator, self.space.slots, self.probe_batches)
        self.base_loss = self._anchor([0] * len(self.space.slots)).eval_loss
        reference = self._anchor(self.space.to_ranks(self.space.reference))
        self.reference_loss = reference.eval_loss
        surrogate = Surrogate(
            self.space.slots, sensitivity, self.space.to_ranks(self.space.reference),
            gain=self.search.surrogate_gain,
        )  # fmt: skip
        # PPO steps its own copies (its vector wrapper resets them); proposals use another
        train_envs = [AllocationEnv(self.space, surrogate, self.lam) for _ in range(POLICY_ENVS)]
        env = AllocationEnv(self.space, surrogate, self.lam)
        policy = build_policy(train_envs, self.search, self.seed)
        n_policy = policy_parameter_count(policy)
        log.info("STRATO policy: MaskablePPO, %s parameters", f"{n_policy:,}")
        budget = self.search.evaluations
        eval_times: list[float] = [reference.wall_time_s] if reference.wall_time_s else []
        stop_reason = "evaluation budget spent"
        with Progress(transient=False) as progress:
            bar = progress.add_task("STRATO search (real evaluations)", total=budget)
            progress.update(bar, completed=self._real_count())
            while self._real_count() < budget:
                cap = self.search.max_wall_time_s
                expected = float(np.mean(eval_times)) if eval_times else 0.0
                if cap is not None and time.perf_counter() - start + expected > cap:
                    stop_reason = f"wall-time cap {cap:g} s"
                    break
                self._fit(surrogate)
                for train_env in train_envs:  # the surrogate changed under them
                    train_env.phi = train_env.potential(train_env.ranks)
                with _one_thread():  # tiny tensors: threads only add synchronisation
                    policy.learn(self.search.policy_timesteps, reset_num_timesteps=False)
                    ranks, source = self._propose(env, policy)
                if ranks is None:
                    stop_reason = "no unseen feasible allocation left to propose"
                    break
                evaluation = self._evaluate(ranks, source)
                eval_times.append(evaluation.wall_time_s)
                progress.update(bar, completed=self._real_count())
        self._fit(surrogate)
        return self._finish(
            previous, sensitivity, surrogate, n_policy, time.perf_counter() - start, stop_reason
        )

    def _real_count(self) -> int:
        """Real evaluations that cost a fine-tune (the base model's loss does not)."""
        return sum(1 for e in self.archive.evaluations() if e.allocation)

    def _fit(self, surrogate: Surrogate) -> None:
        evaluations = [e for e in self.archive.evaluations()]
        surrogate.fit(
            [self.space.to_ranks(e.allocation) for e in evaluations],
            [self.score(e.eval_loss) for e in evaluations],
        )

    def _propose(self, env: AllocationEnv, policy: Any) -> tuple[list[int] | None, str]:
        elites = {
            cell: e
            for cell, e in self.archive.elites(self._elite_objective).items()
            if self.within_budget(e)
        }
        explore = bool(elites) and self.rng.random() < self.search.explore_fraction
        source = "explore" if explore else "policy"
        options_list: list[dict[str, Any] | None] = []
        for _ in range(self.search.candidates):
            options = None
            if explore:
                cells = sorted(elites)
                weights = [1.0 / (1 + self.archive.visits.get(c, 0)) ** 0.5 for c in cells]
                cell = self.rng.choices(cells, weights)[0]
                self.archive.visits[cell] = self.archive.visits.get(cell, 0) + 1
                elite = self.space.to_ranks(elites[cell].allocation)
                k = max(2, len(self.space.slots) // 10)
                options = {"start": elite, "slots": self.rng.sample(range(len(elite)), k)}
            options_list.append(options)
        proposals = sample_episodes(env, policy, len(options_list), options_list)
        ranked = sorted(proposals, key=lambda r: -env.potential(r))
        seen_hits: set[str] = set()
        for ranks in ranked:
            allocation = self.space.to_dict(ranks)
            if not allocation:
                continue
            key = allocation_hash(allocation)
            if key in self.archive:
                if key not in seen_hits:
                    seen_hits.add(key)
                    stored = self.archive.get(key)
                    assert stored is not None
                    self.cache_hits.append(
                        {"hash": key, "source": source, "eval_loss": stored.eval_loss,
                         "after_real_evaluations": self._real_count()}
                    )  # fmt: skip
                continue
            return ranks, source
        for _ in range(200):  # every proposal was known: fall back to random feasible ones
            ranks = random_allocation(self.space, self.rng)
            allocation = self.space.to_dict(ranks)
            if allocation and allocation_hash(allocation) not in self.archive:
                return ranks, "random-fallback"
        return None, source

    # -- outputs -------------------------------------------------------------------------
    def _finish(
        self,
        previous: set[str],
        sensitivity: list[float],
        surrogate: Surrogate,
        n_policy: int,
        wall: float,
        stop_reason: str,
    ) -> SearchOutcome:
        rows = []
        for e in self.archive.evaluations():
            ranks = self.space.to_ranks(e.allocation)
            rows.append(
                {
                    "hash": e.hash,
                    "source": e.source,
                    "resumed": e.hash in previous,
                    "candidate": e.extra.get("candidate", True),
                    "within_budget": self.space.feasible(ranks),
                    "eval_loss": e.eval_loss,
                    "score": self.score(e.eval_loss),
                    "normalised_cost": self.space.normalised_cost(ranks),
                    "objective": self.objective(e) if e.allocation else 0.0,
                    "surrogate_prediction": surrogate.predict(ranks),
                    "params": e.params,
                    "params_fraction": e.params_fraction,
                    "flops_per_token": e.flops_per_token,
                    "flops_fraction": e.flops_fraction,
                    "memory_bytes": e.memory_bytes,
                    "wall_time_s": e.wall_time_s,
                    "adapted_modules": len(e.allocation),
                    "allocation": e.allocation,
                }
            )
        candidates = [r for r in rows if r["candidate"] and r["allocation"] and r["within_budget"]]
        if not candidates:
            raise RuntimeError(
                "the STRATO search made no real evaluation of a candidate allocation "
                "(raise peft.strato.search.evaluations or max_wall_time_s)"
            )
        best = max(candidates, key=lambda r: r["objective"])
        points = [r for r in rows if r["allocation"]]
        pareto = {
            "params": [
                _point(r, "params_fraction") for r in pareto_front(points, "params_fraction")
            ],
            "flops": [_point(r, "flops_fraction") for r in pareto_front(points, "flops_fraction")],
        }
        summary = {
            "complete": True,
            "protocol": self.protocol,
            "splits": self.splits,
            "space": self.space.describe(),
            "lambda": self.lam,
            "policy": {"algorithm": "sb3-contrib MaskablePPO", "parameters": n_policy},
            "base_loss": self.base_loss,
            "reference_loss": self.reference_loss,
            "real_evaluations": sum(1 for r in rows if r["allocation"]),
            "cache_hits": self.cache_hits,
            "stop_reason": stop_reason,
            "search_wall_time_s": wall,
            "evaluation_wall_time_s": sum(r["wall_time_s"] for r in rows),
            "surrogate_theta": surrogate.describe(),
            "sensitivity": {s.name: v for s, v in zip(self.space.slots, sensitivity, strict=True)},
            "best": {k: v for k, v in best.items() if k != "allocation"},
            "evaluations": rows,
        }
        atomic_write_json(self.folder / PARETO_FILE, pareto)
        atomic_write_json(self.folder / SEARCH_FILE, summary)
        atomic_write_json(self.folder / ALLOCATION_FILE, best["allocation"])
        _plot_pareto(points, pareto, self.folder / PARETO_PLOT)
        self.archive.close()
        return SearchOutcome(dict(best["allocation"]), summary)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _point(row: dict[str, Any], cost: str) -> dict[str, Any]:
    return {"hash": row["hash"], "score": row["score"], cost: row[cost], "source": row["source"]}


def _plot_pareto(
    points: list[dict[str, Any]], pareto: dict[str, list[dict[str, Any]]], path: Path
) -> None:
    """Score against params and against FLOPs, the front highlighted (best effort)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "params_fraction", "trainable params / reference"),
        (axes[1], "flops_fraction", "training FLOPs / reference"),
    ):
        ax.scatter([p[key] for p in points], [p["score"] for p in points], c="0.6", s=18)
        front = pareto["params" if key == "params_fraction" else "flops"]
        ax.plot([p[key] for p in front], [p["score"] for p in front], "o-", c="C3")
        ax.set_xlabel(label)
        ax.set_ylabel("score (1 = reference LoRA)")
        ax.grid(alpha=0.3)
    fig.suptitle("STRATO real evaluations and Pareto front")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
