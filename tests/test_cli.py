"""The command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from strato_peft.cli import main
from tests.conftest import CONFIGS, ROOT

LORA = str(CONFIGS / "llama2_7b_mmlu_lora.yaml")


def test_acceptance_command_offline_under_30s() -> None:
    """The foundation issue's acceptance command, as a subprocess with the hub offline."""
    start = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config",
            "configs/llama2_7b_mmlu_lora.yaml",
            "--dry-run",
            "--json",
            "--override",
            "peft.method=lora",
            "--override",
            "peft.rank=8",
            "--override",
            "peft.target_modules=[q_proj,v_proj]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(ROOT / ".cache" / "home")},
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # stdout is exactly one JSON object
    assert report["total_params"] == 6_738_415_616
    assert report["trainable_params"] == 4_194_304
    assert elapsed < 30, f"dry run took {elapsed:.1f}s"


def test_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", LORA, "--dry-run", "--seed", "43"]) == 0
    out = capsys.readouterr().out
    assert "trainable params 8,388,608" in out
    assert "q_proj r=16 layers 0-31; v_proj r=16 layers 0-31" in out
    assert "results/llama2_7b/mmlu/lora_rank16_seed43" in out


def test_run_subcommand_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", LORA, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "lora"


def test_config_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--config", LORA, "--dry-run", "--override", "training.learning_rat=1e-3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        "config error: --override: unknown key 'training.learning_rat'; did you mean "
        "'training.learning_rate'? (valid here: batch_size, eval_batch_size, eval_every_steps, "
        "gradient_accumulation_steps, gradient_checkpointing, learning_rate, lr_scheduler, "
        "max_grad_norm, max_steps, num_epochs, save_every_steps, warmup_ratio, weight_decay)"
    )


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "configs/nope.yaml", "--dry-run"]) == 2
    assert (
        "config file not found: " in (err := capsys.readouterr().err) and "configs/nope.yaml" in err
    )


def test_unavailable_platform_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--config", LORA, "--platform", "cuda"]) == 1
    assert "platform 'cuda' was requested" in capsys.readouterr().err


def test_flags_become_overrides() -> None:
    from strato_peft.commands.run import flag_overrides

    class Args:
        platform, no_wandb, profile, debug = "cpu", True, True, False

    assert flag_overrides(Args()) == [
        "device_info.device_type=cpu",
        "logging.wandb=false",
        "logging.profile=true",
    ]


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["scroe"]) == 2
    assert "did you mean 'score'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--config", LORA, "--json"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["--config", LORA, "--platform", "tpu"])


def test_bare_key_value_overrides_work_like_override(capsys: pytest.CaptureFixture[str]) -> None:
    """Hydra and torchtune users type ``peft.rank=8``: the same as ``--override``, with the
    same errors, in any position."""
    assert main(["--config", LORA, "--dry-run", "--json", "peft.rank=8"]) == 0
    bare = json.loads(capsys.readouterr().out)
    assert main(["--config", LORA, "--dry-run", "--json", "--override", "peft.rank=8"]) == 0
    assert bare == json.loads(capsys.readouterr().out)
    assert main(["peft.rank=8", "--config", LORA, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == bare
    assert main(["--config", LORA, "peft.rank=8", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == bare
    assert main(["--config", LORA, "--dry-run", "peft.rnak=8"]) == 2
    assert "peft.rnak" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--config", LORA, "--dry-run", "peft.rank"])
    assert exit_.value.code == 2 and "KEY.PATH=VALUE" in capsys.readouterr().err
