"""STRATO v2: data discipline, the structured space, a controller that learns, exact
resumes of rungs, search-cost accounting, and controls matched on cost."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from strato_peft import costs
from strato_peft.adapters import LoraBuilder
from strato_peft.cli import main
from strato_peft.config import load_config
from strato_peft.config.schema import StratoSettings
from strato_peft.encoding import encode_examples
from strato_peft.models import load_model, load_tokenizer
from strato_peft.recipe import LocalAccelerator, TrainingRecipe
from strato_peft.strato import controls
from strato_peft.strato.evaluator import RealEvaluator
from strato_peft.strato.space import build_space
from strato_peft.strato.structured import (
    StructuredEnv,
    StructuredSpace,
    build_structured_policy,
    sample_choices,
)
from strato_peft.tasks import load_task
from tests.conftest import CONFIGS
from tests.test_training import gsm8k_dir, only_run, tiny_args  # noqa: F401  (fixture)

STRUCTURED = [
    "--override", "peft.strato.search.mode=structured",
    "--override", "peft.strato.search.rungs=[1,2]",
    "--override", "peft.strato.search.proposals=[2,1]",
    "--override", "peft.strato.search.policy_timesteps=64",
    "--override", "peft.strato.search.probe_batches=1",
    "--override", "training.max_steps=3",
    "--override", "task.final_eval=false",
]  # fmt: skip


def smollm_space(budget: dict[str, float | None]) -> StructuredSpace:
    settings = StratoSettings.model_validate(
        {"rank_menu": [0, 1, 2, 4, 8, 16], "budget": budget, "reference": {"rank": 16}}
    )
    space = build_space(
        costs.SMOLLM2_135M, settings, reference_rank=16, reference_modules=["q_proj", "v_proj"],
        batch_size=4, seq_len=192, lora_dropout=0.0,
    )  # fmt: skip
    return StructuredSpace(space, [0.0, 0.25, 0.5, 0.75])


# -- data discipline ---------------------------------------------------------------------------
def test_the_search_split_is_held_out_of_training_and_disjoint_from_the_report_split(
    gsm8k_dir: Path,  # noqa: F811
) -> None:
    config = load_config(
        CONFIGS / "experiments" / "tiny_strato.yaml",
        [f"task.data_path={gsm8k_dir}", "task.limit=999"],
    )
    task = load_task(config.task)
    train, search, report = task.train_examples(), task.search_examples(), task.eval_examples()
    assert len(search) == config.task.search_examples
    ids = [{e.id for e in split} for split in (train, search, report)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert load_task(config.task).search_examples() == search  # fixed ids


@pytest.mark.parametrize("mode", ["structured", "per_slot"])
def test_no_search_code_path_reads_a_report_split_example(
    mode: str,
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from strato_peft.strato import halving, search
    from strato_peft.tasks.base import Task

    inside = {"search": False}
    for cls in (halving.StructuredSearch, search.Search):
        real = cls.run

        def run(self, real=real):  # type: ignore[no-untyped-def]
            inside["search"] = True
            try:
                return real(self)
            finally:
                inside["search"] = False

        monkeypatch.setattr(cls, "run", run)
    for name in ("eval_examples", "test_examples"):
        real_split = getattr(Task, name)

        def guarded(self, *args, real_split=real_split, name=name):  # type: ignore[no-untyped-def]
            if inside["search"]:
                raise AssertionError(f"the search read {name}()")
            return real_split(self, *args)

        monkeypatch.setattr(Task, name, guarded)
    extra = STRUCTURED if mode == "structured" else ["--override", "task.final_eval=false"]
    assert main([*tiny_args("strato", gsm8k_dir, tmp_path), *extra]) == 0
    summary = json.loads((only_run(tmp_path) / "search.json").read_text())
    assert set(summary["splits"]) == {"train", "search", "report"}
    assert len(set(summary["splits"].values())) == 3


# -- the structured space and its masks ----------------------------------------------------------
@pytest.mark.parametrize("budget", [{"params": 0.5, "flops": 0.8}, {"params": 0.3, "flops": 0.9}])
def test_structured_masks_keep_params_and_flops_under_both_caps(budget: dict[str, float]) -> None:
    structured = smollm_space(budget)
    space = structured.space
    rng = random.Random(0)
    for _ in range(40):
        choice = structured.random_choice(rng)
        fractions = space.fractions(structured.ranks(choice), memory=False)
        assert fractions["params"] <= budget["params"] + 1e-9
        assert fractions["flops"] <= budget["flops"] + 1e-9
        # every masked option would break a cap even with all later types at rank 0
        prefix = choice[: rng.randrange(structured.n_decisions)]
        for option, ok in enumerate(structured.feasible_options(prefix)):
            trial = [*prefix, option] + [structured.rank_menu.index(0)] * (
                structured.n_decisions - len(prefix) - 1
            )
            assert ok == space.feasible(structured.ranks(trial))


def test_the_structured_space_contains_the_band_rule_and_uniform_qv() -> None:
    structured = smollm_space({"params": 1.0, "flops": None})
    band = structured.ranks(structured.choice_of(15, dict.fromkeys(structured.types, 2)))
    assert {s.layer for s, r in zip(structured.space.slots, band, strict=True) if r} == set(
        range(15, 30)
    )
    qv = structured.space.to_dict(
        structured.ranks(structured.choice_of(0, {"q_proj": 16, "v_proj": 16}))
    )
    assert qv == structured.space.reference


# -- a controller that learns ---------------------------------------------------------------------
def test_ppo_beats_random_proposals_on_a_synthetic_objective_with_a_known_optimum() -> None:
    """Same number of objective evaluations for both; fails if the policy learns nothing
    (random's best of 384 draws in a space of ~1M choices rarely hits the optimum)."""
    structured = smollm_space({"params": 1.0, "flops": None})
    target = [2, 1, 0, 3, 0, 2, 4, 1]  # an interior optimum: one option per decision
    assert all(structured.feasible_options(target[:i])[t] for i, t in enumerate(target))

    def objective_of_choice(choice: list[int]) -> float:
        return -float(sum(abs(a - b) for a, b in zip(choice, target, strict=True)))

    # the env pays objective(ranks); map ranks back to the choice through a lookup
    def objective(ranks: list[int]) -> float:
        for low_index, low in enumerate(structured.lowest_layers):
            by_type = {}
            for slot, rank in zip(structured.space.slots, ranks, strict=True):
                if slot.layer >= low:
                    by_type.setdefault(slot.module_type, rank)
            choice = [low_index] + [
                structured.rank_menu.index(by_type.get(t, 0)) for t in structured.types
            ]
            if structured.ranks(choice) == ranks:
                return objective_of_choice(choice)
        return -100.0

    timesteps = 3072
    episodes = timesteps // structured.n_decisions
    wins = 0
    for seed in (0, 1, 2):
        envs = [StructuredEnv(structured, objective) for _ in range(4)]
        torch.manual_seed(seed)
        policy = build_structured_policy(envs, seed)
        policy.learn(timesteps)
        proposals = sample_choices(StructuredEnv(structured, objective), policy, 16)
        ppo_best = max(objective_of_choice(c) for c in proposals)
        rng = random.Random(seed)
        random_best = max(
            objective_of_choice(structured.random_choice(rng)) for _ in range(episodes)
        )
        wins += ppo_best > random_best
    assert wins >= 2, "PPO's best proposal did not beat random search on the synthetic objective"


# -- multi-fidelity with a real return -------------------------------------------------------------
def _evaluator(gsm8k: Path, schedule_steps: int = 6) -> RealEvaluator:
    config = load_config(
        CONFIGS / "experiments" / "tiny_strato.yaml",
        [f"task.data_path={gsm8k}", "peft.dropout=0.1"],
    )
    task = load_task(config.task)
    tokenizer = load_tokenizer(config.model)
    n = config.task.max_length
    return RealEvaluator(
        load_model(config.model, seed=config.seed),
        encode_examples(task, task.train_examples(), tokenizer, n),
        encode_examples(task, task.search_examples(), tokenizer, n),
        steps=2,
        recipe=TrainingRecipe.from_config(config),
        builder=LoraBuilder.from_settings(config.peft, seed=config.seed),
        accelerator=LocalAccelerator("cpu"),
        pad_token_id=tokenizer.pad_token_id,
        schedule_steps=schedule_steps,
    )


def test_a_resumed_rung_equals_an_uninterrupted_one(gsm8k_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    evaluator = _evaluator(gsm8k_dir)
    allocation = {"model.layers.1.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 2}
    straight, _ = evaluator.train(allocation, 5)
    _, halfway = evaluator.train(allocation, 2)
    halfway.save(tmp_path / "state.pt")
    resumed, state = evaluator.train(allocation, 5, type(halfway).load(tmp_path / "state.pt"))
    assert resumed.train_losses == straight.train_losses  # exact, dropout included
    assert resumed.eval_loss == straight.eval_loss
    assert state.steps == 5 and len(state.train_losses) == 5


def test_structured_search_counts_its_cost_and_the_winner_continues_into_training(
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    assert main([*tiny_args("strato", gsm8k_dir, tmp_path), *STRUCTURED]) == 0
    folder = only_run(tmp_path)
    summary = json.loads((folder / "search.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    per_rung = summary["evaluations_per_rung"]
    assert per_rung == {"1": 3, "2": 2}  # 2 + 1 proposals; the better half promoted
    # steps trained: the reference anchor (1) + 3 candidates x 1 + 2 promotions x (2 - 1)
    assert summary["cost"]["step_equivalents"] == 1 + 3 + 2
    assert summary["cost"]["step_equivalents_ratio"] == pytest.approx(6 / 3)
    assert summary["cost"]["net_step_equivalents_ratio"] == pytest.approx((6 - 2) / 3)
    assert metrics["method"]["continued_from_search"].endswith("@2.pt")
    history = metrics["history"]
    assert [h["step"] for h in history] == [1, 2, 3] and history[0].get("search")
    # the continued training is the winner's uninterrupted training (same recipe and state)
    allocation = json.loads((folder / "allocation.json").read_text())
    evaluator = _evaluator(gsm8k_dir, schedule_steps=3)
    evaluator.builder = LoraBuilder.from_settings(load_config(folder / "config.yaml").peft, seed=42)
    straight, _ = evaluator.train(allocation, 3)
    assert [h["loss"] for h in history] == pytest.approx(straight.train_losses, rel=1e-6)


# -- controls matched on cost ---------------------------------------------------------------------
def test_band_and_random_controls_match_the_found_allocation_within_five_percent() -> None:
    structured = smollm_space({"params": 0.5, "flops": 0.8})
    space = structured.space
    found = space.to_dict(
        structured.ranks(
            structured.choice_of(15, {"q_proj": 4, "v_proj": 8, "up_proj": 2, "down_proj": 1})
        )
    )
    band, summary = controls.band(space, found, structured.types)
    assert summary["lowest_layer"] == 15
    assert all(abs(v) <= controls.MATCH_TOLERANCE for v in summary["deviation"].values()), summary
    assert {s.module_type for s in space.slots if s.name in band} == set(structured.types)
    target = costs.trainable_params(space.arch, found)
    uniform, summary = controls.uniform(space, ["q_proj", "v_proj"], target, "found")
    assert abs(summary["deviation"]["params"]) <= controls.MATCH_TOLERANCE, summary
    assert {s.layer for s in space.slots if s.name in uniform} == set(range(30))
    drawn, summary = controls.random_matched(structured, found, seed=42)
    assert summary["within_tolerance"], summary
    assert all(abs(v) <= controls.MATCH_TOLERANCE for v in summary["deviation"].values())
    assert drawn != found and controls.random_matched(structured, found, seed=42)[0] == drawn


def test_replay_trains_exactly_the_given_allocation_and_refuses_a_foreign_one(
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    allocation = {"model.layers.0.self_attn.k_proj": 2, "model.layers.1.mlp.up_proj": 4}
    given = tmp_path / "allocation_in.json"
    given.write_text(json.dumps(allocation))
    replay = [
        "--override", "peft.strato.control=replay",
        "--override", f"peft.strato.control_from={given}",
        "--override", "training.max_steps=2", "--override", "task.final_eval=false",
    ]  # fmt: skip
    out = tmp_path / "runs"
    assert main(tiny_args("strato", gsm8k_dir, out, *replay)) == 0
    folder = only_run(out)
    assert folder.name == "strato-replay_rank8_seed42"
    assert json.loads((folder / "allocation.json").read_text()) == allocation
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    pattern = adapter["rank_pattern"]
    assert {m: int(pattern.get(m, adapter["r"])) for m in adapter["target_modules"]} == allocation
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["method"]["control"] == {"kind": "replay", "from": str(given)}
    assert not (folder / "search.json").exists()  # no search ran
    # a run folder works as well as a file: the replay of the replay is the same allocation
    again = tmp_path / "again"
    from_folder = [*replay[:2], "--override", f"peft.strato.control_from={folder}", *replay[4:]]
    assert main(tiny_args("strato", gsm8k_dir, again, *from_folder)) == 0
    assert json.loads((only_run(again) / "allocation.json").read_text()) == allocation
    # a module the model does not have: an error naming the file, no traceback
    given.write_text(json.dumps({"model.layers.99.self_attn.q_proj": 4}))
    capsys.readouterr()
    assert main(tiny_args("strato", gsm8k_dir, tmp_path / "bad", *replay)) != 0
    err = capsys.readouterr().err
    assert str(given) in err and "model.layers.99.self_attn.q_proj" in err


def test_the_mass_gain_prices_every_slot_at_its_per_parameter_sensitivity() -> None:
    from strato_peft.strato.surrogate import Surrogate

    space = smollm_space({"params": 0.5, "flops": 0.8}).space
    slots = space.slots
    flat = [1.0] * len(slots)  # the same sensitivity per parameter everywhere
    reference = space.to_ranks(space.reference)

    def per_param_gain(surrogate: Surrogate) -> dict[str, float]:
        return {
            s.module_type: surrogate.slot_gain(i, 1) / (s.d_in + s.d_out)
            for i, s in enumerate(slots)
            if s.layer == 20
        }

    mass = per_param_gain(Surrogate(slots, flat, reference, gain="mass"))
    assert max(mass.values()) == pytest.approx(min(mass.values()))
    per_parameter = per_param_gain(Surrogate(slots, flat, reference))
    # the per-parameter gain divides by the size a second time: k_proj (576 + 192) beats
    # up_proj (576 + 1536) by their size ratio although the probe says they are equal
    ratio = per_parameter["k_proj"] / per_parameter["up_proj"]
    assert ratio == pytest.approx((576 + 1536) / (576 + 192))
    # size: the probe's ablation, the same prices whatever the probe measured
    skewed = [float(i % 7 + 1) for i in range(len(slots))]
    size = per_param_gain(Surrogate(slots, skewed, reference, gain="size"))
    assert max(size.values()) == pytest.approx(min(size.values()))
    with pytest.raises(ValueError, match="unknown surrogate gain"):
        Surrogate(slots, flat, reference, gain="fisher")
