"""The dry run: every shipped config, and its figures against instantiated models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strato_peft.config import load_config
from strato_peft.costs import allocation_from_peft_model
from strato_peft.dry_run import dry_run_report
from strato_peft.methods import MethodError, get_method
from strato_peft.models import build_tiny_model
from tests.conftest import CONFIGS, entry_configs

LLAMA7 = CONFIGS / "llama2_7b_mmlu_lora.yaml"
LLAMA13 = CONFIGS / "experiments" / "p2_llama2_13b_mmlu_lora.yaml"


@pytest.mark.parametrize("path", entry_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_passes_dry_run(path: Path) -> None:
    report = dry_run_report(load_config(path))
    assert report["total_params"] > 0 and 0 < report["trainable_params"] < report["total_params"]
    assert report["adapted_modules"] == len(report["module_ranks"]) > 0


@pytest.mark.parametrize(
    ("path", "overrides", "total", "trainable"),
    [
        # The foundation issue's acceptance figures.
        (LLAMA7, ["peft.rank=8", "peft.target_modules=[q_proj,v_proj]"], 6_738_415_616, 4_194_304),
        # Cost-model acceptance: 32 layers x 2 modules x 16 x (4096 + 4096).
        (LLAMA7, ["peft.rank=16"], 6_738_415_616, 8_388_608),
        (LLAMA7, ["peft.method=dora", "peft.rank=16"], 6_738_415_616, 8_650_752),
        (LLAMA13, ["peft.rank=16"], 13_015_864_320, 13_107_200),
    ],
)
def test_llama2_figures(path: Path, overrides: list[str], total: int, trainable: int) -> None:
    report = dry_run_report(load_config(path, overrides))
    assert (report["total_params"], report["trainable_params"]) == (total, trainable)


def test_strato_reports_its_reference_and_budget() -> None:
    report = dry_run_report(load_config(CONFIGS / "llama2_7b_mmlu_strato.yaml"))
    assert report["method"] == "strato" and report["budget"] == {"params": 0.5, "flops": 0.8}
    assert report["trainable_params"] == 8_388_608  # reference LoRA r16 on q,v
    assert report["run_dir"].endswith("strato_rank16_lambda0.1_seed42")
    plan = report["search_plan"]  # configs/peft/strato_structured.yaml: 8 + 4 candidates
    assert plan["mode"] == "structured" and plan["evaluations_per_rung"] == [12, 6, 3]
    # the anchor and 12 candidates x 25 steps, 6 x (50 - 25), 3 x (100 - 50)
    assert plan["step_equivalents"] == 13 * 25 + 6 * 25 + 3 * 50
    assert plan["flops_upper_bound"] == plan["step_equivalents"] * report["train_flops_per_step"]


TINY = CONFIGS / "experiments" / "tiny_lora.yaml"


@pytest.mark.parametrize(
    "overrides",
    [
        ["peft.method=lora"],
        ["peft.method=dora", "peft.rank=4"],
        ["peft.method=adalora", "peft.rank=4", "peft.adalora.init_rank=6"],
        ["peft.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
        ["peft.layers_to_transform=[1]", "peft.target_modules=[down_proj]"],
        ["peft.rank_pattern={layers.0.self_attn.q_proj: 2, v_proj: 12}"],
    ],
)
def test_dry_run_equals_instantiated_model(overrides: list[str]) -> None:
    cfg = load_config(TINY, overrides)
    report = dry_run_report(cfg)
    model = get_method(cfg.peft, total_steps=10).build(build_tiny_model(cfg.model.architecture))
    assert report["total_params"] == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" not in n and "ranknum" not in n
    )
    assert report["trainable_params"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert report["module_ranks"] == allocation_from_peft_model(model)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_rank_pattern_reaches_the_modules() -> None:
    cfg = load_config(TINY, ["peft.rank_pattern={layers.0.self_attn.q_proj: 2, v_proj: 12}"])
    ranks = dry_run_report(cfg)["module_ranks"]
    assert ranks == {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.self_attn.q_proj": 16,
        "model.layers.0.self_attn.v_proj": 12,
        "model.layers.1.self_attn.v_proj": 12,
    }


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("peft.rank_pattern={k_proj: 4}", "rank_pattern: key 'k_proj' matches no adapted module"),
        ("peft.rank_pattern={'layers.7.self_attn.q_proj': 4}", "key 'layers.7.self_attn.q_proj'"),
        ("peft.alpha_pattern={mlp.up_proj: 4}", "alpha_pattern: key 'mlp.up_proj'"),
        ("peft.target_modules=[q_prj]", "did you mean 'q_proj'"),
        ("peft.layers_to_transform=[0, 5]", "layers [5] do not exist"),
        ("peft.rank_pattern={'q_proj[': 4}", "not a valid regex"),
    ],
)
def test_method_settings_that_match_nothing_are_errors(override: str, fragment: str) -> None:
    with pytest.raises(MethodError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        dry_run_report(load_config(TINY, [override]))


def test_adalora_schedule_must_leave_a_budgeting_phase() -> None:
    cfg = load_config(
        TINY, ["peft.method=adalora", "peft.adalora.tinit=6", "peft.adalora.tfinal=4"]
    )
    with pytest.raises(MethodError, match="leave no budgeting phase in 10"):
        get_method(cfg.peft, total_steps=10).build(build_tiny_model(cfg.model.architecture))


def test_meta_build_allocates_no_memory() -> None:
    cfg = load_config(LLAMA7)
    from strato_peft.models import build_meta_model

    model = build_meta_model(cfg.model)
    assert {p.device for p in model.parameters()} == {torch.device("meta")}
