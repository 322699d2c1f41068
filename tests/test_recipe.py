"""One training recipe and one LoRA builder: a search evaluation trains what a run trains."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from strato_peft.adapters import LoraBuilder
from strato_peft.cli import main
from strato_peft.config import load_config
from strato_peft.encoding import encode_examples
from strato_peft.methods.strato import protocol_fingerprint
from strato_peft.models import load_model, load_tokenizer
from strato_peft.recipe import LocalAccelerator, TrainingRecipe
from strato_peft.strato.evaluator import RealEvaluator
from strato_peft.tasks import load_task
from tests.conftest import CONFIGS
from tests.test_training import gsm8k_dir, only_run, tiny_args  # noqa: F401  (fixture)

STEPS = 3


def test_a_search_evaluation_trains_exactly_what_a_run_trains(
    gsm8k_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = [
        "--override", f"training.max_steps={STEPS}",
        "--override", "peft.rank=4",
        "--override", "peft.dropout=0.1",  # dropout's RNG stream must match too
        "--override", "peft.bias=lora_only",
        "--override", "task.final_eval=false",
    ]  # fmt: skip
    assert main([*tiny_args("lora", gsm8k_dir, tmp_path), *settings]) == 0
    folder = only_run(tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    run_losses = [h["loss"] for h in metrics["history"]]

    config = load_config(folder / "config.yaml")
    task = load_task(config.task)
    tokenizer = load_tokenizer(config.model)
    n = config.task.max_length
    evaluator = RealEvaluator(
        load_model(config.model, seed=config.seed),
        encode_examples(task, task.train_examples(), tokenizer, n),
        encode_examples(task, task.eval_examples(), tokenizer, n),
        steps=STEPS,
        recipe=TrainingRecipe.from_config(config),
        builder=LoraBuilder.from_settings(config.peft, seed=config.seed),
        accelerator=LocalAccelerator("cpu"),
        pad_token_id=tokenizer.pad_token_id,
    )
    allocation = {
        f"model.layers.{layer}.self_attn.{module}": 4
        for layer in (0, 1)
        for module in ("q_proj", "v_proj")
    }
    result = evaluator.evaluate(allocation)
    assert len(run_losses) == STEPS
    assert result.train_losses == pytest.approx(run_losses, rel=1e-6, abs=0)
    assert result.eval_loss == pytest.approx(metrics["final"]["eval_loss"], rel=1e-6)


def _fingerprint(config_overrides: list[str]) -> str:
    config = load_config(CONFIGS / "experiments" / "tiny_strato.yaml", config_overrides)
    recipe = TrainingRecipe.from_config(config)
    builder = LoraBuilder.from_settings(config.peft, seed=config.seed)
    return protocol_fingerprint(config, recipe, builder, 10, 4)


@pytest.mark.parametrize(
    "override",
    [
        "peft.bias=all",
        "peft.dropout=0.05",
        "peft.use_rslora=true",
        "peft.alpha=7",
        "training.learning_rate=0.123",
        "training.lr_scheduler=constant",
        "training.max_grad_norm=0.5",
        "seed=7",
    ],
)
def test_a_setting_that_changes_training_changes_the_search_fingerprint(override: str) -> None:
    assert _fingerprint([override]) != _fingerprint([])


def test_the_fingerprint_covers_every_recipe_and_builder_field() -> None:
    config = load_config(CONFIGS / "experiments" / "tiny_strato.yaml")
    recipe = TrainingRecipe.from_config(config)
    builder = LoraBuilder.from_settings(config.peft, seed=config.seed)
    reference = protocol_fingerprint(config, recipe, builder, 10, 4)
    for obj in (recipe, builder):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            other = (
                (not value)
                if isinstance(value, bool)
                else (value or 0) + 1
                if isinstance(value, (int, float))
                else f"{value}-changed"
            )
            changed = dataclasses.replace(obj, **{field.name: other})  # type: ignore[arg-type]
            pair = (changed, builder) if obj is recipe else (recipe, changed)
            assert protocol_fingerprint(config, *pair, 10, 4) != reference, field.name  # type: ignore[arg-type]


def test_the_alpha_policy_applies_to_every_rank_of_every_arm() -> None:
    def builder(policy: str) -> LoraBuilder:
        return LoraBuilder(32.0, 0.0, False, "none", alpha_policy=policy, reference_rank=16)

    allocation = {"m.layers.0.q_proj": 8, "m.layers.0.v_proj": 4, "m.layers.1.q_proj": 8}
    fixed = builder("fixed").for_allocation(allocation)
    assert (fixed.r, fixed.lora_alpha, fixed.alpha_pattern) == (8, 32.0, {})
    proportional = builder("proportional").for_allocation(allocation)
    # the reference's alpha / r = 2 for every module: alpha 16 at r8, 8 at r4
    assert (proportional.lora_alpha, proportional.alpha_pattern) == (
        16.0,
        {"m.layers.0.v_proj": 8.0},
    )
    uniform = builder("proportional").config(r=16, target_modules=["q_proj", "v_proj"])
    assert uniform.lora_alpha == 32.0  # the reference itself is unchanged
    assert builder("rslora").config(r=4, target_modules=["q_proj"]).use_rslora
    assert not fixed.use_rslora
