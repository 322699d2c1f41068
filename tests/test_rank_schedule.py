"""Dynamic rank scheduling: resize properties, optimizer state, budget, resume, plain-peft reload."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from strato_peft import costs
from strato_peft.cli import main
from strato_peft.config import load_config
from strato_peft.config.schema import RankScheduleSettings
from strato_peft.methods import get_method
from strato_peft.methods.base import MethodError
from strato_peft.methods.rank_schedule import schedule_steps
from strato_peft.methods.resize import lora_layers, module_ranks, resize_layer, resize_model
from strato_peft.models import build_tiny_model
from tests.conftest import CONFIGS, ROOT
from tests.test_training import GSM8K_ROWS, _env, only_run, tiny_args

LAYER = "model.layers.0.self_attn.q_proj"


def tiny_config(*overrides: str) -> Any:
    return load_config(CONFIGS / "experiments" / "tiny_lora.yaml", list(overrides))


def tiny_peft(*overrides: str, total_steps: int | None = None) -> Any:
    config = tiny_config("peft.rank=8", "peft.dropout=0", *overrides)
    method = get_method(config.peft, total_steps=total_steps)
    model = method.build(build_tiny_model(config.model.architecture, seed=0))
    return config, method, model


def randomize_b(model: Any, seed: int = 0) -> None:
    """Trained-looking adapters: B is zero at init, so give it values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def layer_of(model: Any, name: str = LAYER) -> Any:
    return dict(lora_layers(model))[name]


def delta(layer: Any) -> torch.Tensor:
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    return layer.scaling["default"] * (b.double() @ a.double())


def adam_after_one_step(model: Any) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model(torch.randint(0, 49152, (2, 8))).logits.pow(2).mean().backward()
    optimizer.step()
    return optimizer


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cost_model_params(model: Any, terms: costs.CostTerms = costs.PLAIN_LORA) -> int:
    arch = costs.Architecture.from_hf_config(model.base_model.model.config)
    return costs.trainable_params(arch, costs.allocation_from_peft_model(model), terms)


# -- resize operations --------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["peft.use_rslora=true"], ["peft.method=dora"]])
def test_grow_leaves_logits_unchanged(extra: list[str]) -> None:
    _, _, model = tiny_peft(*extra)
    randomize_b(model)
    model.eval()
    x = torch.randint(0, 49152, (2, 10))
    with torch.no_grad():
        before = model(x).logits
    grown = {name: 8 + 3 + i for i, name in enumerate(module_ranks(model))}
    resize_model(model, grown, generator=torch.Generator().manual_seed(1))
    assert module_ranks(model) == grown
    with torch.no_grad():
        after = model(x).logits
    assert (after - before).abs().max().item() < 1e-6
    layer = layer_of(model)
    new_a = layer.lora_A["default"].weight[8:]
    assert new_a.abs().min() > 0 and new_a.abs().max() <= 1 / math.sqrt(64)  # Kaiming bound
    assert layer.lora_B["default"].weight[:, 8:].abs().max() == 0


def test_shrink_error_is_the_norm_of_the_dropped_singular_values() -> None:
    _, _, model = tiny_peft()
    randomize_b(model)
    layer = layer_of(model)
    before = delta(layer)
    sv = torch.linalg.svdvals(before)
    result = resize_layer(layer, 3, name=LAYER)
    with torch.no_grad():
        error = torch.linalg.norm(before - delta(layer))
    expected = torch.linalg.norm(sv[3:8])
    assert float(error) == pytest.approx(float(expected), rel=1e-4)
    assert layer.lora_A["default"].weight.shape == (3, 64)
    torch.testing.assert_close(
        result.dropped * layer.scaling["default"], sv[3:8], rtol=1e-4, atol=0
    )
    # rank-3 truncation is the best: the kept singular values are those of the original
    torch.testing.assert_close(torch.linalg.svdvals(delta(layer))[:3], sv[:3], rtol=1e-4, atol=0)


def test_rank_zero_removes_the_adapter_and_it_grows_back() -> None:
    _, _, model = tiny_peft()
    randomize_b(model)
    model.eval()
    x = torch.randint(0, 49152, (1, 6))
    layer = layer_of(model)
    resize_layer(layer, 0, name=LAYER)
    assert layer.disable_adapters and layer.lora_A["default"].weight.numel() == 0
    assert not layer.lora_A["default"].weight.requires_grad
    with torch.no_grad():
        removed = model(x).logits
        base = layer.base_layer.weight.clone()
    assert trainable(model) == cost_model_params(model)
    resize_layer(layer, 4, name=LAYER)
    assert not layer.disable_adapters and layer.lora_A["default"].weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, removed, rtol=0, atol=1e-6)
    assert torch.equal(layer.base_layer.weight, base)


def test_dora_cannot_reach_rank_zero() -> None:
    _, _, model = tiny_peft("peft.method=dora")
    with pytest.raises(ValueError, match="DoRA"):
        resize_layer(layer_of(model), 0, name=LAYER)


# -- optimizer state ----------------------------------------------------------------------
def test_optimizer_moments_of_kept_components_are_unchanged() -> None:
    _, _, model = tiny_peft()
    randomize_b(model)
    optimizer = adam_after_one_step(model)
    layer = layer_of(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    other = layer_of(model, "model.layers.1.self_attn.v_proj").lora_A["default"].weight
    other_state = {k: v.clone() for k, v in optimizer.state[other].items()}

    # grow: old components and their moments bit for bit, new ones at zero
    old = {k: optimizer.state[a][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    old_b = {k: optimizer.state[b][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    resize_layer(layer, 12, name=LAYER, optimizer=optimizer)
    for key in old:
        assert torch.equal(optimizer.state[a][key][:8], old[key])
        assert torch.equal(optimizer.state[b][key][:, :8], old_b[key])
        assert optimizer.state[a][key][8:].abs().max() == 0
        assert optimizer.state[b][key][:, 8:].abs().max() == 0
    assert torch.equal(a[:8], a_before) and torch.equal(b[:, :8], b_before)

    # shrink into SVD form (a change of basis: moments mapped), then shrink again: now the
    # least important existing components are dropped, the kept ones keep their moments.
    resize_layer(layer, 6, name=LAYER, optimizer=optimizer)
    assert optimizer.state[a]["exp_avg"].shape == (6, 64)
    gen = torch.Generator().manual_seed(3)
    for param in (a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            optimizer.state[param][key] = torch.rand(param.shape, generator=gen)
    kept = {
        (p, k): optimizer.state[p][k].clone() for p in (a, b) for k in ("exp_avg", "exp_avg_sq")
    }
    a_svd, b_svd = a.detach().clone(), b.detach().clone()
    resize_layer(layer, 4, name=LAYER, optimizer=optimizer)
    assert torch.equal(a, a_svd[:4]) and torch.equal(b, b_svd[:, :4])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[a][key], kept[(a, key)][:4])
        assert torch.equal(optimizer.state[b][key], kept[(b, key)][:, :4])
    for key, value in other_state.items():  # other modules untouched
        assert torch.equal(optimizer.state[other][key], value)

    # the optimizer keeps stepping on the resized parameters
    model(torch.randint(0, 49152, (2, 8))).logits.pow(2).mean().backward()
    optimizer.step()
    assert optimizer.state[a]["exp_avg"].shape == a.shape == (4, 64)


# -- scheduler ----------------------------------------------------------------------------
def test_schedule_steps_from_fractions_and_counts() -> None:
    s = RankScheduleSettings(enabled=True, warmup=0.25, final_freeze=0.25, interval=0.25)
    assert schedule_steps(s, 4) == [2, 3]
    assert schedule_steps(s, 100) == [50, 75]
    s = RankScheduleSettings(enabled=True, warmup=10, final_freeze=20, interval=15)
    assert schedule_steps(s, 100) == [25, 40, 55, 70]
    s = RankScheduleSettings(enabled=True, warmup=2, final_freeze=1, at_steps=[1, 3, 0.5, 9])
    assert schedule_steps(s, 10) == [3, 5, 9]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"warmup": 1.5}, "neither a step count"),
        ({"max_rank": 2, "min_rank": 4}, "max_rank"),
        ({"move_fraction": 0.8}, "less than or equal to 0.5"),
        ({"at_steps": []}, "at least one step"),
        ({"warmup_steps": 3}, "warmup_steps"),
    ],
)
def test_bad_schedule_settings_are_clear_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RankScheduleSettings(**settings)


def test_schedule_refuses_adalora_and_dora_rank_zero() -> None:
    with pytest.raises(MethodError, match="AdaLoRA"):
        tiny_peft("peft.method=adalora", "peft.rank_schedule.enabled=true", total_steps=20)
    with pytest.raises(MethodError, match="DoRA"):
        tiny_peft(
            "peft.method=dora", "peft.rank_schedule.enabled=true",
            "peft.rank_schedule.min_rank=0", total_steps=20,
        )  # fmt: skip


def test_budget_and_cost_model_hold_at_every_step_of_a_run() -> None:
    """A training run of the tiny model: after every optimizer step the trainable params
    equal the cost model's figure for the current allocation and stay within budget."""
    _, method, model = tiny_peft(
        "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        "peft.rank_schedule.enabled=true",
        "peft.rank_schedule.warmup=1",
        "peft.rank_schedule.interval=1",
        "peft.rank_schedule.final_freeze=2",
        "peft.rank_schedule.min_rank=0",
        "peft.rank_schedule.rank_step=3",
        total_steps=12,
    )
    from strato_peft.methods.base import StepContext

    scheduler = method.rank_scheduler
    budget = cost_model_params(model)
    assert scheduler.budget == budget == trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    seen: list[dict[str, int]] = [module_ranks(model)]
    for step in range(1, 13):
        x = torch.randint(0, 49152, (2, 8), generator=gen)
        model(x).logits.pow(2).mean().backward()
        optimizer.step()
        context = StepContext(optimizer=optimizer)
        method.on_optimizer_step(model, step, context)
        optimizer.zero_grad(set_to_none=True)
        ranks = module_ranks(model)
        assert context.resized == (ranks != seen[-1])
        assert trainable(model) == cost_model_params(model) <= budget, step
        if step > 10:  # the final freeze
            assert ranks == seen[-1]
        seen.append(ranks)
    history = scheduler.history
    assert sorted(history) == [0, *range(2, 11)]
    summary = method.summary()["rank_schedule"]
    assert summary["grows"] > 0 and summary["shrinks"] > 0
    assert summary["final_params"] == trainable(model) <= budget
    assert any(r == 0 for r in seen[-1].values())  # min_rank 0 lets a module drop its adapter


# -- run folder, resume, plain peft -------------------------------------------------------
@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gsm8k")
    lines = [json.dumps(row) for row in GSM8K_ROWS]
    (folder / "train.jsonl").write_text("\n".join(lines * 4) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    return folder


def schedule_args(data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_args("lora_schedule", data, out, *extra)


def test_fast_dev_run_grows_shrinks_and_saves_an_adapter_plain_peft_loads(
    gsm8k_dir: Path, tmp_path: Path
) -> None:
    """The shipped tiny config's fast dev run (gradient accumulation 2), under bf16
    autocast: resizes happen, the budget holds, and plain peft reloads the adapter."""
    from peft import PeftModel

    from strato_peft.training.checkpoint import STATE_FILE, latest_checkpoint

    args = schedule_args(
        gsm8k_dir, tmp_path, "--fast-dev-run", "--override", "task.final_eval=false",
        "--override", "device_info.precision=bf16",
    )  # fmt: skip
    # A process of its own: accelerate's state is a per-process singleton, and the other
    # tests of this session run in fp32.
    done = subprocess.run(
        [sys.executable, "main.py", *args], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = only_run(tmp_path)
    history = json.loads((folder / "rank_history.json").read_text())
    assert list(history) == ["0", "2", "3"]
    changes = [
        (history[a][m], history[b][m]) for a, b in (("0", "2"), ("2", "3")) for m in history[a]
    ]
    assert any(new > old for old, new in changes) and any(new < old for old, new in changes)
    final = history["3"]

    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    ranks = {name: config["rank_pattern"].get(name, config["r"]) for name in final}
    assert ranks == final
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter" / "adapter_model.safetensors")
    for name, rank in final.items():
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == rank
        assert tensors[f"base_model.model.{name}.lora_B.weight"].shape[1] == rank
    env = json.loads((folder / "env.json").read_text())
    assert "bf16" in json.dumps(env["platform"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["history"]) == 4 and metrics["plan"]["total_steps"] == 4
    costs_json = json.loads((folder / "costs.json").read_text())
    summary = metrics["method"]["rank_schedule"]
    assert costs_json["trainable_params"] == summary["final_params"] <= summary["budget_params"]

    # Plain peft on a fresh base reproduces the logits of the trained (resized) model.
    run_config = load_config(folder / "config.yaml")
    arch = run_config.model.architecture
    reloaded = PeftModel.from_pretrained(build_tiny_model(arch, seed=42), folder / "adapter")
    ours = get_method(run_config.peft).build(build_tiny_model(arch, seed=42))
    state = torch.load(latest_checkpoint(folder) / STATE_FILE, weights_only=True)
    resize_model(ours, state["ranks"])
    with torch.no_grad():
        params = dict(ours.named_parameters())
        for name, tensor in state["adapter"].items():
            params[name].copy_(tensor)
    reloaded.eval()
    ours.eval()
    x = torch.randint(0, 49152, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ours(x).logits, rtol=0, atol=1e-6)


def test_resume_after_a_resize_ends_like_an_uninterrupted_run(
    gsm8k_dir: Path, tmp_path: Path
) -> None:
    """A checkpoint after resizes (step 4 of 6, ranks changed at steps 2 and 3) resumes to
    the same final loss as a run that was never stopped."""
    extra = (
        "--override", "training.max_steps=6",
        "--override", "training.save_every_steps=4",
        "--override", "task.final_eval=false",
        "--override", "peft.rank_schedule.at_steps=[2,3,5]",
        "--override", "peft.rank_schedule.final_freeze=0",
    )  # fmt: skip
    assert main(schedule_args(gsm8k_dir, tmp_path / "full", *extra)) == 0
    expected_folder = only_run(tmp_path / "full")
    expected = json.loads((expected_folder / "metrics.json").read_text())

    # Roll a copy of the finished run back to its step-4 checkpoint, as if killed there.
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", out)
    folder = only_run(out)
    for stale in ("metrics.json", "costs.json", "status.json", "adapter", "rank_history.json"):
        path = folder / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in (folder / "checkpoints").glob("step_*"):
        if path.name != "step_00000004":
            shutil.rmtree(path)
    state = torch.load(folder / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    assert state["ranks"] != state["method"]["rank_schedule"]["history"][0]  # resized before
    assert main(schedule_args(gsm8k_dir, out, *extra)) == 0
    assert "resumed from step_00000004" in (folder / "training.log").read_text()
    resumed = json.loads((folder / "metrics.json").read_text())
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))
    assert resumed["history"][-1]["loss"] == pytest.approx(
        expected["history"][-1]["loss"], rel=1e-6, abs=1e-7
    )
    assert resumed["final"]["eval_loss"] == pytest.approx(expected["final"]["eval_loss"], rel=1e-6)
    assert json.loads((folder / "rank_history.json").read_text()) == json.loads(
        (expected_folder / "rank_history.json").read_text()
    )


def test_rank_plots_from_a_history(tmp_path: Path) -> None:
    from strato_peft.analysis.plots import (
        load_rank_history,
        rank_history_heatmap,
        rank_matrix,
        rank_over_steps,
    )

    history = {
        "0": {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.up_proj": 8},
        "5": {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 12},
    }
    (tmp_path / "rank_history.json").write_text(json.dumps(history))
    loaded = load_rank_history(tmp_path)
    assert loaded == {0: history["0"], 5: history["5"]}
    fig = rank_over_steps(loaded, total_steps=10)
    lines = [line for line in fig.axes[0].get_lines() if line.get_label() == "mean rank"]
    assert list(lines[0].get_ydata()) == [8.0, 8.0, 8.0] and list(lines[0].get_xdata()) == [
        0,
        5,
        10,
    ]
    heat = rank_history_heatmap(loaded)
    assert heat.axes[0].get_title() == "ranks at step 5"
    assert rank_matrix(loaded[5])[2][0][0] == 4.0 and rank_matrix(loaded[5])[2][1][1] == 12.0
    assert rank_history_heatmap(loaded, step=3).axes[0].get_title() == "ranks at step 0"


def test_schedule_starts_on_the_first_step_for_a_method_that_builds_its_own_model() -> None:
    """STRATO builds its peft model itself: the hook attaches the schedule on first use,
    with the budget of the model's initial allocation, and its state round-trips."""
    from peft import get_peft_model

    from strato_peft.methods.base import StepContext

    config = tiny_config(
        "peft.rank=8", "peft.dropout=0", "peft.rank_schedule.enabled=true",
        "peft.rank_schedule.at_steps=[2]", "peft.rank_schedule.warmup=1",
    )  # fmt: skip
    method = get_method(config.peft, total_steps=4)
    base = build_tiny_model(config.model.architecture, seed=0)
    model = get_peft_model(base, method.peft_config(base))
    assert method.rank_scheduler is None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    budget = trainable(model)
    for step in (1, 2):
        model(torch.randint(0, 49152, (2, 8))).logits.pow(2).mean().backward()
        optimizer.step()
        method.on_optimizer_step(model, step, StepContext(optimizer=optimizer))
        optimizer.zero_grad(set_to_none=True)
    scheduler = method.rank_scheduler
    assert scheduler is not None and scheduler.budget == budget
    assert sorted(scheduler.history) == [0, 2] and scheduler.history[2] != scheduler.history[0]
    assert trainable(model) <= budget
    other = get_method(config.peft, total_steps=4)
    other.load_state_dict(method.state_dict())
    model2 = get_peft_model(
        build_tiny_model(config.model.architecture, seed=0), method.peft_config(base)
    )
    resize_model(model2, module_ranks(model))
    other.on_optimizer_step(model2, 3, StepContext())
    assert (
        other.rank_scheduler.budget == budget and other.rank_scheduler.history == scheduler.history
    )
