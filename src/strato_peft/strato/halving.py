"""STRATO v2: a structured search with successive halving over resumable real evaluations.

1. **Probe** the per-parameter sensitivity of every slot (dropout off), averaged over
   ``search.probe_seeds`` seeds; the Spearman correlation of two probes' slot rankings
   is reported as its stability.
2. **Anchors** on the search-validation split: the base model (score 0) and the
   reference LoRA at the first rung (score 1).
3. **Proposals** (``search.proposals``, one batch after another): MaskablePPO learns on
   the surrogate in the structured environment (:mod:`.structured`) and the best unseen
   episodes are proposed; between batches the surrogate is refitted to the real
   first-rung scores. ``random-search`` proposes random feasible choices instead, with
   the same counts (the controller's ablation).
4. **Successive halving** (Jamieson & Talwalkar 2016; Hyperband, Li et al. 2017): every
   candidate trains ``rungs[0]`` steps; the better half continues, *resuming* from its
   stored adapter, optimizer, scheduler, data position and RNG, to ``rungs[1]`` steps,
   and so on. Every (allocation, steps) is evaluated once; the archive keeps the state
   next to the row, so a killed search resumes without repeating work.
5. **Result**: the best candidate of the last rung. Its state continues into the final
   training (a checkpoint of the run), so its steps are not trained twice.

Search cost is counted in optimizer-step equivalents (every candidate step, the
reference anchor's included) and in wall seconds, both reported against one training
of the run (``search.json``). Candidates are prefixes of their own final training: the
learning-rate schedule of every evaluation runs over the run's total steps.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strato_peft.results import (
    ALLOCATION_FILE,
    SEARCH_FILE,
    SEARCH_STATES_DIR,
    atomic_write_json,
)
from strato_peft.strato.archive import Evaluation, open_archive
from strato_peft.strato.evaluator import CandidateState, RealEvaluator, probe_sensitivity
from strato_peft.strato.search import SearchOutcome, _one_thread
from strato_peft.strato.space import allocation_hash
from strato_peft.strato.structured import (
    StructuredEnv,
    StructuredSpace,
    build_structured_policy,
    sample_choices,
)
from strato_peft.strato.surrogate import Surrogate

log = logging.getLogger(__name__)

POLICY_ENVS = 4


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (``None`` below 3 pairs or with a constant side)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from scipy import stats

    return float(stats.spearmanr(a, b).statistic)


@dataclass
class Candidate:
    choice: list[int]
    source: str
    losses: dict[int, float]
    """Steps -> search-split loss after that many steps."""


class StructuredSearch:
    """One structured STRATO search (see the module docstring)."""

    def __init__(
        self,
        structured: StructuredSpace,
        evaluator: RealEvaluator,
        settings: Any,
        folder: Path,
        *,
        seed: int,
        protocol: str,
        proposer: str = "ppo",
        splits: dict[str, str] | None = None,
        training_steps: int | None = None,
    ) -> None:
        self.structured = structured
        self.space = structured.space
        self.evaluator = evaluator
        self.settings = settings
        self.search = settings.search
        self.folder = folder
        self.seed = seed
        self.protocol = protocol
        self.proposer = proposer
        self.splits = splits or {}
        self.training_steps = training_steps or max(self.search.rungs)
        # a rung cannot train past the run (a --fast-dev-run has 4 steps in all)
        self.rungs = sorted({min(r, self.training_steps) for r in self.search.rungs})
        self.lam = float(settings.lambda_)
        self.rng = random.Random(f"structured-{seed}")
        self.archive = open_archive(self.search, folder, protocol)
        self.states = folder / SEARCH_STATES_DIR
        self.base_loss = 0.0
        self.reference_loss = 0.0
        self.steps_trained = 0
        self.eval_seconds = 0.0

    # -- real evaluations ------------------------------------------------------------------
    def score(self, loss: float) -> float:
        denom = self.base_loss - self.reference_loss
        if abs(denom) <= 1e-9:
            denom = 1e-9
        return (self.base_loss - loss) / denom

    def _key(self, allocation: dict[str, int], steps: int) -> str:
        return f"{allocation_hash(allocation)}@{steps}"

    def _state_path(self, key: str) -> Path:
        return self.states / f"{key}.pt"

    def evaluate(
        self, ranks: list[int], steps: int, source: str, previous: int | None = None
    ) -> float:
        """The search-split loss of ``ranks`` after ``steps`` steps (resumed from
        ``previous`` steps when given); each (allocation, steps) is trained once."""
        allocation = self.space.to_dict(ranks)
        key = self._key(allocation, steps)
        found = self.archive.get(key)
        if found is not None:  # done before this search was killed: its cost still counts
            self.steps_trained += int(found.extra.get("steps", steps)) - int(
                found.extra.get("resumed_from") or 0
            )
            self.eval_seconds += found.wall_time_s
            return found.eval_loss
        state = None
        if previous is not None:
            state = CandidateState.load(self._state_path(self._key(allocation, previous)))
        start = time.perf_counter()
        result, new_state = self.evaluator.train(allocation, steps, state)
        wall = time.perf_counter() - start
        self.steps_trained += steps - (previous or 0)
        self.eval_seconds += wall
        new_state.save(self._state_path(key))
        fractions = self.space.fractions(ranks, memory=True)
        self.archive.add(
            Evaluation(
                hash=key, allocation=allocation, eval_loss=result.eval_loss,
                params=self.space.params(ranks), params_fraction=fractions["params"],
                flops_per_token=self.space.flops(ranks), flops_fraction=fractions["flops"],
                memory_bytes=self.space.report(allocation).memory_bytes, wall_time_s=wall,
                source=source,
                extra={"steps": steps, "resumed_from": previous, "train_losses": result.train_losses},
            )
        )  # fmt: skip
        log.info(
            "real evaluation (%s, %d steps%s): loss %.4f, params %.3fx, flops %.3fx, %.1f s",
            source, steps, f", resumed at {previous}" if previous else "", result.eval_loss,
            fractions["params"], fractions["flops"], wall,
        )  # fmt: skip
        return result.eval_loss

    # -- proposals -------------------------------------------------------------------------
    def _objective(self, surrogate: Surrogate) -> Any:
        def objective(ranks: list[int]) -> float:
            if not any(ranks):
                return 0.0
            return surrogate.predict(ranks) - self.lam * self.space.normalised_cost(ranks)

        return objective

    def _propose(self, count: int, surrogate: Surrogate, seen: set[str]) -> list[list[int]]:
        fresh: list[list[int]] = []

        def take(choice: list[int]) -> bool:
            ranks = self.structured.ranks(choice)
            key = allocation_hash(self.space.to_dict(ranks))
            if not any(ranks) or key in seen:
                return False
            seen.add(key)
            fresh.append(choice)
            return len(fresh) >= count

        if self.proposer == "random":
            for _ in range(2000):
                if take(self.structured.random_choice(self.rng)):
                    break
            return fresh
        objective = self._objective(surrogate)
        envs = [StructuredEnv(self.structured, objective) for _ in range(POLICY_ENVS)]
        with _one_thread():
            policy = build_structured_policy(envs, self.seed)
            policy.learn(self.search.policy_timesteps)
            sampled = sample_choices(
                StructuredEnv(self.structured, objective), policy, self.search.candidates
            )
        self.policy_parameters = sum(p.numel() for p in policy.policy.parameters())
        ranked = sorted(sampled, key=lambda c: -objective(self.structured.ranks(c)))
        for choice in ranked:
            if take(choice):
                break
        for _ in range(2000):  # the policy collapsed onto known choices: fill at random
            if len(fresh) >= count or take(self.structured.random_choice(self.rng)):
                break
        return fresh

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> SearchOutcome:
        start = time.perf_counter()
        rungs = self.rungs
        sensitivity, stability = self._probe()
        reference_ranks = self.space.to_ranks(self.space.reference)
        self.base_loss = self.evaluator.base_loss()
        self.reference_loss = self.evaluate(reference_ranks, rungs[0], "anchor")
        surrogate = Surrogate(
            self.space.slots, sensitivity, reference_ranks, gain=self.search.surrogate_gain
        )
        self.policy_parameters = 0
        seen = {allocation_hash(self.space.reference)}
        candidates: list[Candidate] = []
        for batch, count in enumerate(self.search.proposals):
            for choice in self._propose(count, surrogate, seen):
                source = "random" if self.proposer == "random" else f"policy-batch{batch}"
                loss = self.evaluate(self.structured.ranks(choice), rungs[0], source)
                candidates.append(Candidate(choice, source, {rungs[0]: loss}))
            surrogate.fit(
                [self.structured.ranks(c.choice) for c in candidates],
                [self.score(c.losses[rungs[0]]) for c in candidates],
            )
        if not candidates:
            raise RuntimeError("the structured search proposed no candidate")
        alive = list(candidates)
        for previous, steps in itertools.pairwise(rungs):
            if len(alive) <= 1:
                break
            alive = sorted(alive, key=lambda c: c.losses[previous])[: math.ceil(len(alive) / 2)]
            for c in alive:
                c.losses[steps] = self.evaluate(
                    self.structured.ranks(c.choice), steps, "promoted", previous=previous
                )
        last = max(alive[0].losses)
        winner = min(alive, key=lambda c: c.losses[last])
        return self._finish(candidates, winner, last, surrogate, sensitivity, stability, start)

    def _probe(self) -> tuple[list[float], float | None]:
        if self.search.surrogate_gain == "size":  # the surrogate ignores the probe
            return [1.0] * len(self.space.slots), None
        probes = [
            probe_sensitivity(self.evaluator, self.space.slots, self.search.probe_batches, seed=k)
            for k in range(self.search.probe_seeds)
        ]
        mean = [float(np.mean(values)) for values in zip(*probes, strict=True)]
        stability = spearman(probes[0], probes[1]) if len(probes) > 1 else None
        return mean, stability

    def _finish(
        self,
        candidates: list[Candidate],
        winner: Candidate,
        last: int,
        surrogate: Surrogate,
        sensitivity: list[float],
        stability: float | None,
        start: float,
    ) -> SearchOutcome:
        rungs = self.rungs
        ranks = self.structured.ranks(winner.choice)
        allocation = self.space.to_dict(ranks)
        rows: list[dict[str, Any]] = []
        for c in candidates:
            r = self.structured.ranks(c.choice)
            fractions = self.space.fractions(r, memory=False)
            rows.append(
                {
                    "choice": self.structured.describe(c.choice), "source": c.source,
                    "losses": {str(k): v for k, v in sorted(c.losses.items())},
                    "score_first_rung": self.score(c.losses[rungs[0]]),
                    "surrogate_prediction": surrogate.predict(r),
                    "params_fraction": fractions["params"], "flops_fraction": fractions["flops"],
                    "hash": allocation_hash(self.space.to_dict(r)),
                }
            )  # fmt: skip
        proxy = {
            f"{a}->{b}": spearman(
                [c.losses[a] for c in candidates if b in c.losses],
                [c.losses[b] for c in candidates if b in c.losses],
            )
            for a, b in itertools.pairwise(rungs)
        }
        fit = spearman(
            [float(r["surrogate_prediction"]) for r in rows],
            [float(r["score_first_rung"]) for r in rows],
        )
        step_equivalents = self.steps_trained
        summary = {
            "complete": True,
            "mode": "structured",
            "proposer": self.proposer,
            "protocol": self.protocol,
            "splits": self.splits,
            "space": {**self.space.describe(), "decisions": self.structured.n_decisions,
                      "lowest_layers": self.structured.lowest_layers, "types": self.structured.types},
            "rungs": rungs,
            "evaluations_per_rung": {str(s): sum(1 for c in candidates if s in c.losses) for s in rungs},
            "policy": {"algorithm": "sb3-contrib MaskablePPO", "parameters": self.policy_parameters},
            "base_loss": self.base_loss,
            "reference_loss": self.reference_loss,
            "winner": {**self.structured.describe(winner.choice), "steps": last,
                       "loss": winner.losses[last], "hash": allocation_hash(allocation)},
            "best": {"eval_loss": winner.losses[last], "steps": last},
            "candidates": rows,
            "proxy_spearman": proxy,
            "surrogate_theta": surrogate.describe(),
            "surrogate_gain": surrogate.gain,
            "surrogate_fit_spearman": fit,
            "sensitivity_probe_stability_spearman": stability,
            "sensitivity": {s.name: v for s, v in zip(self.space.slots, sensitivity, strict=True)},
            "cost": {
                "step_equivalents": step_equivalents,
                "step_equivalents_ratio": step_equivalents / self.training_steps,
                "winner_steps_reused": last,
                "net_step_equivalents_ratio": (step_equivalents - last) / self.training_steps,
                "evaluation_wall_time_s": self.eval_seconds,
                "search_wall_time_s": time.perf_counter() - start,
                "training_steps": self.training_steps,
            },
            "real_evaluations": len(self.archive.evaluations()),
            "lambda": self.lam,
        }  # fmt: skip
        atomic_write_json(self.folder / SEARCH_FILE, summary)
        atomic_write_json(self.folder / ALLOCATION_FILE, allocation)
        self.archive.close()
        return SearchOutcome(allocation, summary, self._state_path(self._key(allocation, last)))
