"""The training loop through its public interface: run folders, reload, resume, DDP."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from strato_peft.cli import main
from strato_peft.config import load_config
from strato_peft.dry_run import dry_run_report
from strato_peft.methods import get_method
from strato_peft.models import build_tiny_model
from strato_peft.training.checkpoint import STATE_FILE, latest_checkpoint
from tests.conftest import CONFIGS

GSM8K_ROWS = [
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    }
    for a, b in [
        (3, 4),
        (10, 5),
        (7, 8),
        (2, 9),
        (12, 30),
        (1, 1),
        (6, 6),
        (20, 3),
        (8, 13),
        (5, 40),
    ]
]


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few GSM8K-format examples in the release layout (train.jsonl / test.jsonl)."""
    folder = tmp_path_factory.mktemp("gsm8k")
    lines = [json.dumps(row) for row in GSM8K_ROWS]
    (folder / "train.jsonl").write_text("\n".join(lines * 4) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    return folder


def tiny_args(method: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIGS / "experiments" / f"tiny_{method}.yaml"),
        "--override", f"task.data_path={data}",
        "--override", f"output.dir={out}",
        "--override", f"logging.log_dir={out}/logs",
        "--no-wandb",
        *extra,
    ]  # fmt: skip


def only_run(out: Path) -> Path:
    (folder,) = [p for p in out.glob("*/*/*") if p.is_dir()]
    return folder


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_fast_dev_run_writes_a_complete_folder_that_plain_peft_reloads(
    method: str, gsm8k_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    observe = ["--profile", "--override", "logging.tensorboard=true"] if method == "lora" else []
    assert main([*tiny_args(method, gsm8k_dir, tmp_path), "--fast-dev-run", *observe]) == 0
    folder = only_run(tmp_path)
    if observe:  # profiler traces, TensorBoard scalars and the shared training log
        assert list((tmp_path / "logs" / "profiles").glob("*.pt.trace.json"))
        assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
        assert "complete:" in (tmp_path / "logs" / "training.log").read_text()
    assert folder.name == f"{method}_rank{8 if method == 'adalora' else 16}_seed42_fast-dev-run"
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "complete"
    for name in ("config.yaml", "metrics.json", "costs.json", "env.json", "training.log"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    costs = json.loads((folder / "costs.json").read_text())
    env = json.loads((folder / "env.json").read_text())
    assert metrics["fast_dev_run"] and metrics["steps"] == 4 == len(metrics["history"])
    assert metrics["data_source"].startswith("data_path:")
    assert {"strict-match", "flexible-extract", "n"} <= set(metrics["task"])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in metrics["history"])
    assert (
        costs["micro_batch_flops"] > 0
        and costs["tokens_per_s"] > 0
        and costs["peak_memory_bytes"] > 0
    )
    assert env["seed"] == 42 and env["packages"]["peft"]

    # The saved config repeats the run; its dry run gives the same trainable params.
    config = load_config(folder / "config.yaml")
    assert costs["trainable_params"] == dry_run_report(config)["trainable_params"]

    # Plain peft reloads the adapter with the trained weights (final checkpoint) and ranks.
    base = build_tiny_model(config.model.architecture, seed=config.seed)
    reloaded = PeftModel.from_pretrained(base, folder / "adapter")
    ours = get_method(config.peft, total_steps=4).build(
        build_tiny_model(config.model.architecture, seed=config.seed)
    )
    state = torch.load(latest_checkpoint(folder) / STATE_FILE, weights_only=True)
    with torch.no_grad():
        params = dict(ours.named_parameters())
        for name, tensor in state["adapter"].items():
            if params[name].shape != tensor.shape:  # AdaLoRA pruned: masked ranks stay in E
                pytest.fail(f"{name}: {params[name].shape} vs {tensor.shape}")
            params[name].copy_(tensor)
    reloaded.eval()
    ours.eval()
    x = torch.randint(0, 49152, (2, 12))
    torch.testing.assert_close(reloaded(x).logits, ours(x).logits, rtol=0, atol=1e-6)
    trained = [t for n, t in state["adapter"].items() if "lora_B" in n]
    assert any(t.abs().sum() > 0 for t in trained)  # B starts at zero: training moved it


def test_same_seed_same_losses(gsm8k_dir: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            main([*tiny_args("lora", gsm8k_dir, out), "--override", "task.final_eval=false"]) == 0
        )
        runs.append(
            [h["loss"] for h in json.loads((only_run(out) / "metrics.json").read_text())["history"]]
        )
    assert runs[0] == runs[1]
    out = tmp_path / "c"
    assert (
        main(
            [
                *tiny_args("lora", gsm8k_dir, out),
                "--seed",
                "43",
                "--override",
                "task.final_eval=false",
            ]
        )
        == 0
    )
    other = [h["loss"] for h in json.loads((only_run(out) / "metrics.json").read_text())["history"]]
    assert other != runs[0]


def test_complete_run_is_not_repeated(gsm8k_dir: Path, tmp_path: Path) -> None:
    args = [*tiny_args("lora", gsm8k_dir, tmp_path), "--override", "task.final_eval=false"]
    assert main(args) == 0
    metrics = only_run(tmp_path) / "metrics.json"
    before = metrics.stat().st_mtime_ns
    assert main(args) == 0
    assert metrics.stat().st_mtime_ns == before


def test_failed_run_is_marked_failed(
    gsm8k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"question": "q"}\n')
    (bad / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    assert main(tiny_args("lora", bad, tmp_path / "out")) == 1
    assert "train.jsonl:1" in capsys.readouterr().err
    folder = only_run(tmp_path / "out")
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "failed" and "answer" in status["error"]
    assert not (folder / "metrics.json").exists() and not (folder / "adapter").exists()


def _command(method: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "main.py", *tiny_args(method, data, out, *extra)]


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def test_token_loss_sum_counts_answer_tokens_only() -> None:
    from strato_peft.encoding import IGNORE_INDEX, Collator, encode, token_loss_sum

    class Tok:  # whitespace tokenizer: one id per word
        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [len(w) for w in text.split()]}

    item = encode("a bb ccc", "dddd e", Tok(), max_length=16)
    assert item is not None and item.input_ids == [1, 2, 3, 4, 1]
    assert item.labels == [IGNORE_INDEX] * 3 + [4, 1] and item.target_tokens == 2
    cut = encode("a bb ccc", "dddd e", Tok(), max_length=4)  # the prompt is cut from the left
    assert cut is not None and cut.input_ids == [2, 3, 4, 1]
    batch = Collator(pad_token_id=0)([item, cut])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    loss, count = token_loss_sum(logits, batch["labels"])
    logp = torch.log_softmax(logits, dim=-1)
    expected = -(logp[0, 2, 4] + logp[0, 3, 1] + logp[1, 1, 4] + logp[1, 2, 1])
    assert int(count) == 4
    torch.testing.assert_close(loss, expected)
