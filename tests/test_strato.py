"""STRATO's search parts, fast: budget masks, reward decomposition, archive, surrogate, policy.

The end-to-end search on the tiny model (SIGKILL and resume, plain-peft reload, controls)
is in ``tests/integration/test_strato_runs.py``.
"""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato_peft import costs
from strato_peft.config.schema import StratoSearch, StratoSettings
from strato_peft.strato.archive import Archive, Evaluation
from strato_peft.strato.env import AllocationEnv
from strato_peft.strato.evaluator import EvaluationResult
from strato_peft.strato.search import (
    MAX_POLICY_PARAMS,
    build_policy,
    pareto_front,
    policy_parameter_count,
    random_allocation,
)
from strato_peft.strato.space import SearchSpace, allocation_hash, build_space
from strato_peft.strato.surrogate import Surrogate
from tests.conftest import CONFIGS

QV = ["q_proj", "v_proj"]
REL = 1e-9  # float slack when re-deriving a cost fraction through another code path


def tiny_architecture() -> costs.Architecture:
    """The architecture of ``configs/models/tiny_llama.yaml``."""
    fields = yaml.safe_load((CONFIGS / "models" / "tiny_llama.yaml").read_text())["model"][
        "architecture"
    ]
    return costs.Architecture(
        hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"],
        num_hidden_layers=fields["num_hidden_layers"],
        num_attention_heads=fields["num_attention_heads"],
        num_key_value_heads=fields["num_key_value_heads"],
        vocab_size=fields["vocab_size"],
        tie_word_embeddings=fields["tie_word_embeddings"],
        name="tiny_llama",
    )


ARCHITECTURES = {"tiny": tiny_architecture(), "smollm2": costs.SMOLLM2_135M}


def make_space(
    arch: costs.Architecture,
    *,
    params: float | None = 0.7,
    flops: float | None = None,
    menu: list[int] | None = None,
    module_types: list[str] | None = None,
    reference_rank: int = 8,
    seq_len: int = 64,
    batch_size: int = 2,
) -> SearchSpace:
    settings = StratoSettings.model_validate(
        {
            "rank_menu": menu or [0, 2, 4, 8, 16, 32],
            "module_types": module_types or list(costs.MODULE_TYPES),
            "budget": {"params": params, "flops": flops},
        }
    )
    return build_space(
        arch, settings, reference_rank=reference_rank, reference_modules=QV,
        batch_size=batch_size, seq_len=seq_len, lora_dropout=0.0,
    )  # fmt: skip


_REFERENCE_REPORTS: dict[tuple[Any, ...], costs.CostReport] = {}


def exact_fractions(space: SearchSpace, ranks: list[int]) -> dict[str, float]:
    """Cost fractions straight from the cost model (params and training FLOPs per token, as
    :func:`costs.estimate_costs` computes them), not through the space's shortcuts."""
    key = (space.arch, space.batch_size, space.seq_len, tuple(sorted(space.reference.items())))
    settings = costs.CostSettings(batch_size=space.batch_size, seq_len=space.seq_len)
    if key not in _REFERENCE_REPORTS:
        _REFERENCE_REPORTS[key] = costs.estimate_costs(
            space.arch, space.reference, costs.CostTerms(), settings
        )
    ref = _REFERENCE_REPORTS[key]
    allocation = space.to_dict(ranks)
    flops = costs.training_flops(space.arch, allocation, costs.CostTerms(), settings)
    tokens = space.batch_size * space.seq_len
    return {
        "params": costs.trainable_params(space.arch, allocation, costs.CostTerms())
        / ref.trainable_params,
        "flops": flops.train / tokens / ref.train_flops_per_token,
    }


def random_surrogate(space: SearchSpace, rng: random.Random) -> Surrogate:
    sensitivity = [rng.uniform(0.05, 3.0) for _ in space.slots]
    return Surrogate(space.slots, sensitivity, space.to_ranks(space.reference))


# -- 1. masking never exceeds the budget; reward = potential ----------------------------------


BUDGETS = st.one_of(
    st.tuples(st.floats(0.05, 1.5), st.none()),
    st.tuples(st.none(), st.floats(0.55, 1.2)),
    st.tuples(st.floats(0.05, 1.5), st.floats(0.55, 1.2)),
)


def check_random_episodes(
    arch: costs.Architecture, budget: tuple[float | None, float | None], seed: int, episodes: int
) -> None:
    params_cap, flops_cap = budget
    rng = random.Random(seed)
    menu = sorted({0, 8, *rng.sample([1, 2, 3, 4, 16, 32, 64], rng.randint(0, 4))})
    space = make_space(arch, params=params_cap, flops=flops_cap, menu=menu)
    env = AllocationEnv(space, random_surrogate(space, rng), lam=rng.uniform(0.0, 2.0))
    for episode in range(episodes):
        options = None
        if episode % 2:  # Go-Explore: return to a feasible allocation, re-decide some slots
            start = random_allocation(space, rng)
            options = {"start": start, "slots": rng.sample(range(len(start)), 3)}
        env.reset(seed=seed, options=options)
        total, done = 0.0, False
        while not done:
            slot = env.queue[env.position]
            mask = env.action_masks()
            assert mask[space.rank_menu.index(0)], "rank 0 must always be allowed"
            for index, allowed in enumerate(mask):  # the fast mask == the exact test, per entry
                trial = list(env.ranks)
                trial[slot] = space.rank_menu[index]
                assert bool(allowed) == space.feasible(trial), (slot, space.rank_menu[index])
            action = rng.choice([i for i, ok in enumerate(mask) if ok])
            _, reward, done, _, _ = env.step(action)
            total += reward
            exact = exact_fractions(space, env.ranks)
            if params_cap is not None:
                assert exact["params"] <= params_cap * (1 + REL)
            if flops_cap is not None:
                assert exact["flops"] <= flops_cap * (1 + REL)
        if options is None:  # phi(empty) = 0: the return is the potential of the result
            expected = env.potential(env.ranks)
            assert total == pytest.approx(expected, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=BUDGETS, seed=st.integers(0, 2**31 - 1))
def test_masks_keep_every_partial_allocation_of_tiny_within_budget(
    budget: tuple[float | None, float | None], seed: int
) -> None:
    check_random_episodes(ARCHITECTURES["tiny"], budget, seed, episodes=4)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=BUDGETS, seed=st.integers(0, 2**31 - 1))
def test_masks_keep_every_partial_allocation_of_smollm2_within_budget(
    budget: tuple[float | None, float | None], seed: int
) -> None:
    check_random_episodes(ARCHITECTURES["smollm2"], budget, seed, episodes=1)


def test_masks_bind_the_budget_is_reached_not_just_respected() -> None:
    """Greedy largest-allowed ranks end close to the cap: the mask is not over-cautious."""
    space = make_space(ARCHITECTURES["smollm2"], params=0.7)
    env = AllocationEnv(space, random_surrogate(space, random.Random(0)), lam=0.5)
    env.reset()
    done = False
    while not done:
        mask = env.action_masks()
        _, _, done, _, _ = env.step(max(i for i, ok in enumerate(mask) if ok))
    params = exact_fractions(space, env.ranks)["params"]
    smallest = min(2 * (s.d_in + s.d_out) for s in space.slots)
    assert 0.7 - smallest / space.reference_report.trainable_params < params <= 0.7


def test_a_budget_below_the_frozen_forward_is_refused() -> None:
    """An empty allocation still costs the forward pass; a cap under it leaves no action."""
    arch = ARCHITECTURES["tiny"]
    empty = exact_fractions(make_space(arch, params=None, flops=1.0), [0] * 14)["flops"]
    assert 0.1 < empty < 0.9
    with pytest.raises(ValueError, match="budget"):
        make_space(arch, params=None, flops=empty * 0.9)


def test_masked_action_is_refused() -> None:
    space = make_space(ARCHITECTURES["tiny"], params=0.05)
    env = AllocationEnv(space, random_surrogate(space, random.Random(1)), lam=0.5)
    env.reset()
    mask = env.action_masks()
    assert not mask[-1]
    with pytest.raises(ValueError, match="masked"):
        env.step(len(mask) - 1)


# -- 2. the archive ----------------------------------------------------------------------------


def evaluation(allocation: dict[str, int], loss: float, source: str = "policy") -> Evaluation:
    return Evaluation(
        hash=allocation_hash(allocation), allocation=allocation, eval_loss=loss,
        params=sum(allocation.values()), params_fraction=0.5, flops_per_token=1.0,
        flops_fraction=0.9, memory_bytes=1.0, wall_time_s=0.1, source=source,
    )  # fmt: skip


A = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 8}


def test_allocation_hash_is_canonical() -> None:
    reordered = dict(reversed(list(A.items())))
    with_zeros = {**A, "model.layers.1.self_attn.k_proj": 0}
    assert allocation_hash(A) == allocation_hash(reordered) == allocation_hash(with_zeros)
    assert allocation_hash(A) != allocation_hash({**A, "model.layers.1.mlp.up_proj": 16})
    assert allocation_hash(A) != allocation_hash({"model.layers.0.self_attn.q_proj": 4})
    assert allocation_hash({}) == allocation_hash({"model.layers.0.self_attn.q_proj": 0})


def test_archive_refuses_a_second_evaluation_of_the_same_allocation(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "a.sqlite", "p1")
    archive.add(evaluation(A, 1.5))
    with pytest.raises(RuntimeError, match="never evaluate an allocation twice"):
        archive.add(evaluation(dict(reversed(list(A.items()))), 1.2))
    assert len(archive) == 1 and archive.get(allocation_hash(A)).eval_loss == 1.5  # type: ignore[union-attr]
    archive.close()


def test_archive_persists_and_keeps_protocols_apart(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "archive.sqlite"
    first = Archive(path, "p1")
    first.add(evaluation(A, 1.5, "anchor"))
    first.add(evaluation({"model.layers.0.self_attn.v_proj": 2}, 1.25, "explore"))
    first.close()

    again = Archive(path, "p1")
    rows = again.evaluations()
    assert [(e.allocation, e.eval_loss, e.source) for e in rows] == [
        (A, 1.5, "anchor"),
        ({"model.layers.0.self_attn.v_proj": 2}, 1.25, "explore"),
    ]
    assert allocation_hash(A) in again and len(again) == 2
    other = Archive(path, "p2")
    assert len(other) == 0 and allocation_hash(A) not in other and other.get(rows[0].hash) is None
    other.add(evaluation(A, 9.0))  # the same allocation under another protocol is new
    assert again.get(allocation_hash(A)).eval_loss == 1.5  # type: ignore[union-attr]
    assert other.get(allocation_hash(A)).eval_loss == 9.0  # type: ignore[union-attr]
    again.close()
    other.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM evaluations").fetchone() == (3,)


def test_corrupt_archive_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "archive.sqlite"
    path.write_bytes(b"this is not sqlite at all\x00" * 200)
    with pytest.raises(ValueError, match="not a usable STRATO archive") as info:
        Archive(path, "p1")
    assert str(path) in str(info.value)


def test_elites_are_the_best_of_each_cost_cell(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "a.sqlite", "p")
    cheap_bad = evaluation({"model.layers.0.self_attn.q_proj": 2}, 2.0)
    cheap_good = evaluation({"model.layers.0.self_attn.q_proj": 4}, 1.0)
    anchor = evaluation({"model.layers.0.self_attn.v_proj": 2}, 0.1, "anchor")
    anchor.extra = {"candidate": False}
    pricey = evaluation({"model.layers.1.mlp.up_proj": 8}, 1.5)
    pricey.params_fraction = 0.95
    for e in (cheap_bad, cheap_good, anchor, pricey):
        archive.add(e)
    elites = archive.elites(lambda e: -e.eval_loss)
    assert {cell: e.hash for cell, e in elites.items()} == {
        (5, 9): cheap_good.hash,
        (9, 9): pricey.hash,
    }
    archive.close()


# -- 4. the policy is small --------------------------------------------------------------------


def mlp_params(obs: int, actions: int, width: int = 64) -> int:
    """MaskablePPO's MlpPolicy with pi=[64, 64] and vf=[64, 64] heads, counted by hand."""
    trunk = (obs * width + width) + (width * width + width)
    return 2 * trunk + (width * actions + actions) + (width + 1)


def test_policy_on_a_smollm2_sized_space_is_under_half_a_million_params() -> None:
    from strato_peft.strato.env import OBS_SIZE

    space = make_space(costs.SMOLLM2_135M, params=0.7)
    assert len(space.slots) == 210
    env = AllocationEnv(space, random_surrogate(space, random.Random(0)), lam=0.5)
    policy = build_policy([env], StratoSearch(policy_timesteps=64), seed=0)
    count = policy_parameter_count(policy)
    assert count == sum(p.numel() for p in policy.policy.parameters())
    assert count == mlp_params(OBS_SIZE, len(space.rank_menu)) <= MAX_POLICY_PARAMS
    # it learns and proposes feasible allocations on the masked environment
    policy.learn(64)
    obs, _ = env.reset()
    done = False
    while not done:
        action, _ = policy.predict(obs, action_masks=env.action_masks(), deterministic=False)
        obs, _, done, _, _ = env.step(int(action))
    assert exact_fractions(space, env.ranks)["params"] <= 0.7 * (1 + REL)


# -- 7. the surrogate and the Pareto front -----------------------------------------------------


def test_surrogate_prior_scores_the_reference_one() -> None:
    space = make_space(ARCHITECTURES["smollm2"])
    rng = random.Random(3)
    surrogate = random_surrogate(space, rng)
    reference = space.to_ranks(space.reference)
    assert surrogate.predict(reference) == pytest.approx(1.0, rel=1e-12)
    surrogate.fit([], [])
    assert surrogate.fitted_on == 0
    np.testing.assert_array_equal(surrogate.theta, surrogate.prior)
    assert surrogate.predict(reference) == pytest.approx(1.0, rel=1e-12)
    assert surrogate.predict([0] * len(space.slots)) == 0.0
    # additive: the slot gains of an allocation sum to its prediction
    ranks = random_allocation(space, rng)
    gains = sum(surrogate.slot_gain(i, r) for i, r in enumerate(ranks))
    assert gains == pytest.approx(surrogate.predict(ranks), rel=1e-12)


def test_surrogate_fit_recovers_known_per_type_coefficients() -> None:
    space = make_space(ARCHITECTURES["smollm2"], params=1.5)
    rng = random.Random(4)
    surrogate = random_surrogate(space, rng)
    truth = {t: rng.uniform(0.001, 0.05) for t in surrogate.types}
    theta = np.array([truth[t] for t in surrogate.types])

    def varied() -> list[int]:
        """Each module type opened to its own random share of slots: per-type totals vary
        independently (budgeted allocations make the type features nearly collinear)."""
        share = {t: rng.random() for t in surrogate.types}
        menu = [r for r in space.rank_menu if r]
        return [rng.choice(menu) if rng.random() < share[s.module_type] else 0 for s in space.slots]

    allocations = [varied() for _ in range(500)]
    scores = [float(surrogate.features(r) @ theta) for r in allocations]
    # by hand, the way the docstring defines it
    r0 = allocations[0]
    by_hand = sum(
        truth[s.module_type] * surrogate.sensitivity[i] * math.log2(1 + r)
        for i, (s, r) in enumerate(zip(space.slots, r0, strict=True))
    )
    assert scores[0] == pytest.approx(by_hand, rel=1e-12)
    surrogate.fit(allocations, scores)
    assert surrogate.fitted_on == 500
    np.testing.assert_allclose(surrogate.theta, theta, rtol=0.03)  # the prior's pull: ~1/n
    unregularised = Surrogate(
        space.slots, surrogate.sensitivity, space.to_ranks(space.reference), ridge=0.0
    )
    unregularised.fit(allocations, scores)
    np.testing.assert_allclose(unregularised.theta, theta, rtol=1e-9)
    # with two points it stays near the prior (ridge towards it), not at the truth
    few = random_surrogate(space, random.Random(4))
    few.fit(allocations[:2], scores[:2])
    assert np.abs(few.theta - few.prior).max() < np.abs(theta - few.prior).max()


def test_pareto_front_is_the_non_dominated_set() -> None:
    points = [
        {"name": "a", "score": 0.5, "cost": 0.2},
        {"name": "b", "score": 0.4, "cost": 0.3},  # dominated by a
        {"name": "c", "score": 0.9, "cost": 0.5},
        {"name": "d", "score": 0.8, "cost": 0.5},  # dominated by c (same cost)
        {"name": "e", "score": 0.9, "cost": 0.9},  # dominated by c (same score)
        {"name": "f", "score": 1.2, "cost": 1.0},
        {"name": "g", "score": 0.1, "cost": 0.1},
    ]
    rng = random.Random(0)
    rng.shuffle(points)
    assert [p["name"] for p in pareto_front(points, "cost")] == ["g", "a", "c", "f"]
    assert pareto_front([], "cost") == []


# -- the search loop, with synthetic evaluations instead of fine-tunes --------------------------


class SyntheticEvaluator:
    """Stands in for the short fine-tunes: the loss falls with log-ranks, more for MLP slots."""

    def __init__(self) -> None:
        self.calls: list[dict[str, int]] = []

    def evaluate(self, allocation: dict[str, int]) -> EvaluationResult:
        self.calls.append(dict(allocation))
        gain = sum(
            (2.0 if "mlp" in name else 1.0) * math.log2(1 + rank)
            for name, rank in allocation.items()
        )
        return EvaluationResult(3.0 - 0.01 * gain, 0.001)


def run_search(
    folder: Path, monkeypatch: pytest.MonkeyPatch, evaluations: int, **budget: float | None
) -> tuple[Any, SyntheticEvaluator]:
    from strato_peft.strato import search as search_module

    monkeypatch.setattr(
        search_module, "probe_sensitivity", lambda evaluator, slots, batches: [1.0] * len(slots)
    )
    settings = StratoSettings.model_validate(
        {
            "rank_menu": [0, 2, 4, 8, 16],
            "reference": {"rank": 8, "target_modules": QV},
            "budget": {"params": 0.7, "flops": None, **budget},
            "search": {"evaluations": evaluations, "policy_timesteps": 64, "candidates": 8},
        }
    )
    space = build_space(
        ARCHITECTURES["tiny"], settings, reference_rank=8, reference_modules=QV,
        batch_size=2, seq_len=64, lora_dropout=0.0,
    )  # fmt: skip
    evaluator = SyntheticEvaluator()
    search = search_module.Search(space, evaluator, settings, folder, seed=0, protocol="synthetic")  # type: ignore[arg-type]
    return search.run(), evaluator


def test_search_evaluates_each_allocation_once_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, first = run_search(tmp_path, monkeypatch, evaluations=4)
    hashes = [allocation_hash(a) for a in first.calls]
    assert len(hashes) == len(set(hashes)) and {} in first.calls
    assert sum(1 for a in first.calls if a) == 4 == outcome.summary["real_evaluations"]
    space = make_space(ARCHITECTURES["tiny"], params=0.7, menu=[0, 2, 4, 8, 16])
    assert space.feasible(space.to_ranks(outcome.allocation))

    # a larger budget on the same archive: the stored evaluations (anchors included) are reused
    outcome, second = run_search(tmp_path, monkeypatch, evaluations=6)
    assert not {allocation_hash(a) for a in second.calls} & set(hashes)
    assert len(second.calls) == 2
    rows = outcome.summary["evaluations"]
    assert [r["hash"] for r in rows if r["resumed"]] == hashes
    assert len({r["hash"] for r in rows}) == len(rows) == 7


def test_result_respects_this_runs_budget_in_a_shared_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared archive may hold allocations evaluated under a looser budget: the search
    must neither return one of them nor return to them as elites."""
    loose = {
        f"model.layers.{layer}.{block}.{m}": 16
        for layer in range(2)
        for block, modules in (
            ("self_attn", ("q_proj", "v_proj", "o_proj")),
            ("mlp", ("up_proj", "down_proj")),
        )
        for m in modules
    }
    archive = Archive(tmp_path / "archive.sqlite", "synthetic")
    archive.add(evaluation(loose, 0.5))  # far better than anything within 0.7x params
    archive.close()
    outcome, evaluator = run_search(tmp_path, monkeypatch, evaluations=4)
    assert loose not in evaluator.calls and len(evaluator.calls) >= 3  # base, reference, 1+
    space = make_space(ARCHITECTURES["tiny"], params=0.7, menu=[0, 2, 4, 8, 16])
    assert not space.feasible(space.to_ranks(loose))
    assert outcome.allocation != loose
    assert space.feasible(space.to_ranks(outcome.allocation))
