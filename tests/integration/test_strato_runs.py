"""STRATO end to end on the tiny model, through the CLI and the run folder.

One search is shared by the module (``killed_and_resumed``): it is SIGKILLed once the
archive holds three real evaluations, then the same command finishes it. The other tests
read its folder: the plain-peft reload, the policy's size, the controls.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from strato_peft import costs
from strato_peft.cli import main
from strato_peft.config import load_config
from strato_peft.methods import get_method
from strato_peft.methods.base import RunContext
from strato_peft.models import build_tiny_model
from strato_peft.strato.env import AllocationEnv
from strato_peft.strato.search import build_policy, policy_parameter_count
from strato_peft.strato.space import allocation_hash
from strato_peft.strato.surrogate import Surrogate
from strato_peft.training.checkpoint import STATE_FILE, latest_checkpoint
from tests.conftest import CONFIGS, ROOT
from tests.test_training import GSM8K_ROWS, _env, tiny_args

CONFIG = CONFIGS / "experiments" / "tiny_strato.yaml"
FOLDER = Path("tiny_llama") / "gsm8k" / "strato_rank8_lambda0.5_seed42_fast-dev-run"
EVALUATIONS = 5  # peft.strato.search.evaluations of tiny_strato.yaml, the reference's included
PARAMS_BUDGET = 0.7
KILL_AT_ROWS = 3  # the base model's anchor, the reference's, one policy proposal


@dataclass
class ResumedRun:
    folder: Path
    before_kill: dict[str, float]  # archive rows (hash -> eval_loss) when SIGKILL landed
    status_at_kill: str


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--seed", "42", "--fast-dev-run", *tiny_args("strato", data, out, *extra)]


def archive_rows(path: Path) -> dict[str, float]:
    """hash -> eval_loss of every row; {} while the file or its table does not exist yet."""
    if not path.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return dict(db.execute("SELECT hash, eval_loss FROM evaluations").fetchall())
    except sqlite3.OperationalError:  # no table yet, or locked mid-commit
        return {}


@pytest.fixture(scope="module")
def gsm8k_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gsm8k")
    lines = [json.dumps(row) for row in GSM8K_ROWS]
    (folder / "train.jsonl").write_text("\n".join(lines * 4) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    return folder


@pytest.fixture(scope="module")
def killed_and_resumed(gsm8k_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ResumedRun:
    """The tiny STRATO fast-dev-run, SIGKILLed mid-search, then run again to completion."""
    out = tmp_path_factory.mktemp("strato")
    folder = out / FOLDER
    command = [sys.executable, "main.py", *args(gsm8k_data, out)]
    log = out / "killed.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=_env(), stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(archive_rows(folder / "archive.sqlite")) >= KILL_AT_ROWS:
                break
            time.sleep(0.05)
        exited = proc.poll()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert exited is None, f"exited ({exited}) before the kill:\n{log.read_text()[-3000:]}"
    before = archive_rows(folder / "archive.sqlite")
    assert len(before) >= KILL_AT_ROWS, log.read_text()[-3000:]
    status = json.loads((folder / "status.json").read_text())["status"]

    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return ResumedRun(folder, before, status)


def tiny_architecture() -> Any:
    return load_config(CONFIG).model.architecture


def read(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())


# -- 3. kill and resume: nothing lost, nothing evaluated twice -------------------------------------


def test_killed_search_resumes_without_losing_or_repeating_an_evaluation(
    killed_and_resumed: ResumedRun,
) -> None:
    run = killed_and_resumed
    folder = run.folder
    assert run.status_at_kill == "running"
    assert read(folder, "status.json")["status"] == "complete"
    for name in ("allocation.json", "search.json", "pareto.json", "metrics.json", "costs.json"):
        assert (folder / name).is_file(), name
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()

    after = archive_rows(folder / "archive.sqlite")
    for key, loss in run.before_kill.items():  # nothing lost, nothing re-measured
        assert after[key] == loss

    search = read(folder, "search.json")
    rows = search["evaluations"]
    hashes = [r["hash"] for r in rows]
    assert len(hashes) == len(set(hashes)) == len(after)
    assert {r["hash"]: r["eval_loss"] for r in rows} == after
    for r in rows:
        assert r["hash"] == allocation_hash(r["allocation"])
        assert r["resumed"] is (r["hash"] in run.before_kill), r["hash"]
    assert sum(r["resumed"] for r in rows) == len(run.before_kill)
    real = [r for r in rows if r["allocation"]]
    assert len(real) == search["real_evaluations"] <= EVALUATIONS
    assert any(not r["resumed"] for r in real)  # the second run carried the search on
    assert search["complete"] and search["stop_reason"] == "evaluation budget spent"
    sources = {"policy", "explore", "random-fallback", "anchor"}
    assert {r["source"] for r in rows} <= sources
    for hit in search["cache_hits"]:  # a proposal already in the archive was not re-evaluated
        assert hit["hash"] in after

    # the result: the evaluated candidate with the best real objective, within the budget
    allocation = read(folder, "allocation.json")
    candidates = [r for r in real if r["candidate"]]
    best = max(candidates, key=lambda r: r["objective"])
    assert allocation == best["allocation"] and search["best"]["hash"] == best["hash"]
    arch = costs.Architecture.from_hf_config(build_tiny_model(tiny_architecture()).config)
    reference = costs.uniform_allocation(arch, 8, ["q_proj", "v_proj"])
    fraction = costs.trainable_params(arch, allocation) / costs.trainable_params(arch, reference)
    assert fraction <= PARAMS_BUDGET and fraction == pytest.approx(best["params_fraction"])
    for r in real:  # the reference anchor is the one allocation allowed over the budget
        assert r["within_budget"] is (r["params_fraction"] <= PARAMS_BUDGET)
        assert r["within_budget"] or r["source"] == "anchor"

    # the Pareto fronts are non-dominated subsets of the real evaluations
    pareto = read(folder, "pareto.json")
    for key, cost in (("params", "params_fraction"), ("flops", "flops_fraction")):
        front = pareto[key]
        assert front and {p["hash"] for p in front} <= {r["hash"] for r in real}
        for p in front:
            assert not any(
                r[cost] <= p[cost] and r["score"] >= p["score"]
                and (r[cost] < p[cost] or r["score"] > p["score"])
                for r in real
            )  # fmt: skip


# -- 4. the policy is small, and search.json says how small ----------------------------------------


def test_search_json_reports_the_policy_parameter_count(killed_and_resumed: ResumedRun) -> None:
    config = load_config(killed_and_resumed.folder / "config.yaml")
    method = get_method(config.peft, total_steps=4)
    space = method.space(build_tiny_model(config.model.architecture, seed=42))  # type: ignore[attr-defined]
    surrogate = Surrogate(space.slots, [1.0] * len(space.slots), space.to_ranks(space.reference))
    env = AllocationEnv(space, surrogate, lam=0.5)
    count = policy_parameter_count(build_policy([env], config.peft.strato.search, seed=42))
    assert 0 < count <= 500_000
    assert read(killed_and_resumed.folder, "search.json")["policy"]["parameters"] == count


# -- 5. the adapter is a plain peft LoRA ------------------------------------------------------------


def test_saved_adapter_loads_in_plain_peft_with_the_found_ranks_and_logits(
    killed_and_resumed: ResumedRun,
) -> None:
    from peft import PeftModel, get_peft_model

    folder = killed_and_resumed.folder
    allocation = read(folder, "allocation.json")
    adapter_config = read(folder / "adapter", "adapter_config.json")
    assert set(adapter_config["target_modules"]) == set(allocation)
    for name, rank in allocation.items():
        assert adapter_config["rank_pattern"].get(name, adapter_config["r"]) == rank

    config = load_config(folder / "config.yaml")
    reloaded = PeftModel.from_pretrained(
        build_tiny_model(config.model.architecture, seed=config.seed), folder / "adapter"
    )
    ranks = {
        name.removeprefix("base_model.model."): module.lora_A["default"].weight.shape[0]
        for name, module in reloaded.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert ranks == allocation

    # the same allocation rebuilt through strato_peft, with the trainer's final weights
    method = get_method(config.peft, total_steps=4)
    ours = get_peft_model(
        build_tiny_model(config.model.architecture, seed=config.seed),
        method.allocation_config(allocation),  # type: ignore[attr-defined]
    )
    state = torch.load(latest_checkpoint(folder) / STATE_FILE, weights_only=True)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, tensor in state["adapter"].items():
            assert params[name].shape == tensor.shape, name
            params[name].copy_(tensor)
    assert any(t.abs().sum() > 0 for n, t in state["adapter"].items() if "lora_B" in n)
    reloaded.eval()
    ours.eval()
    x = torch.randint(
        0, config.model.architecture.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        plain = reloaded(x).logits
        torch.testing.assert_close(plain, ours(x).logits, rtol=0, atol=1e-5)
        merged = reloaded.merge_and_unload()(x).logits
        torch.testing.assert_close(plain, merged, rtol=0, atol=1e-5)


# -- 6. the controls ---------------------------------------------------------------------------------


def test_uniform_control_matches_the_found_allocations_params(
    killed_and_resumed: ResumedRun, gsm8k_data: Path, tmp_path: Path
) -> None:
    found = read(killed_and_resumed.folder, "allocation.json")
    extra = ("--override", "peft.strato.control=uniform",
             "--override", f"peft.strato.control_from={killed_and_resumed.folder}",
             "--override", "task.final_eval=false")  # fmt: skip
    assert main(args(gsm8k_data, tmp_path, *extra)) == 0
    folder = tmp_path / "tiny_llama" / "gsm8k" / "strato-uniform_rank8_seed42_fast-dev-run"
    assert read(folder, "status.json")["status"] == "complete"

    arch = tiny_architecture()
    width = {  # d_in + d_out of each module type of the tiny Llama
        "q_proj": 2 * arch.hidden_size,
        "k_proj": arch.hidden_size
        + arch.num_key_value_heads * (arch.hidden_size // arch.num_attention_heads),
        "v_proj": arch.hidden_size
        + arch.num_key_value_heads * (arch.hidden_size // arch.num_attention_heads),
        "o_proj": 2 * arch.hidden_size,
        "gate_proj": arch.hidden_size + arch.intermediate_size,
        "up_proj": arch.hidden_size + arch.intermediate_size,
        "down_proj": arch.hidden_size + arch.intermediate_size,
    }
    target = sum(rank * width[name.rsplit(".", 1)[1]] for name, rank in found.items())
    per_rank = arch.num_hidden_layers * (width["q_proj"] + width["v_proj"])
    rank = max(1, int(target // per_rank))
    allocation = read(folder, "allocation.json")
    assert set(allocation) == {
        f"model.layers.{layer}.self_attn.{m}"
        for layer in range(arch.num_hidden_layers)
        for m in ("q_proj", "v_proj")
    }
    # rank r everywhere, r + 1 on as many modules (top layers first) as bring the params
    # closest to the found allocation's: one integer rank can miss it by more than 5%
    assert set(allocation.values()) <= {rank, rank + 1}
    params = sum(r * width[n.rsplit(".", 1)[1]] for n, r in allocation.items())
    assert abs(params - target) <= max(width["q_proj"], width["v_proj"])  # one module's rank
    control = read(folder, "metrics.json")["method"]["control"]
    assert control["kind"] == "uniform" and control["rank"] == rank
    assert control["target_params"] == target
    assert read(folder, "costs.json")["trainable_params"] == params
    assert not (folder / "search.json").exists()  # a control does not search


def random_control(seed: int) -> dict[str, int]:
    config = load_config(CONFIG, overrides=["peft.strato.control=random"], seed=seed)
    method = get_method(config.peft, total_steps=4)
    method.setup_run(RunContext(config, None, None, Path("unused"), None))
    return method.choose_allocation(build_tiny_model(config.model.architecture, seed=seed))  # type: ignore[attr-defined]


def test_random_control_is_feasible_and_seeded(gsm8k_data: Path, tmp_path: Path) -> None:
    extra = ("--override", "peft.strato.control=random", "--override", "task.final_eval=false")
    assert main(args(gsm8k_data, tmp_path, *extra)) == 0
    folder = tmp_path / "tiny_llama" / "gsm8k" / "strato-random_rank8_seed42_fast-dev-run"
    assert read(folder, "status.json")["status"] == "complete"
    allocation = read(folder, "allocation.json")
    assert allocation and set(allocation.values()) <= {2, 4, 8, 16}

    arch = costs.Architecture.from_hf_config(build_tiny_model(tiny_architecture()).config)
    reference = costs.uniform_allocation(arch, 8, ["q_proj", "v_proj"])
    params = costs.trainable_params(arch, allocation)
    assert params / costs.trainable_params(arch, reference) <= PARAMS_BUDGET
    assert read(folder, "costs.json")["trainable_params"] == params
    assert not (folder / "search.json").exists()

    assert random_control(42) == allocation == random_control(42)
    assert random_control(43) != allocation
