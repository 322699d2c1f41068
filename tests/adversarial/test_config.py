"""Adversarial configs: the dry run rejects what a real run would reject (a seed numpy
cannot take, a precision the platform code refuses) and warns about a STRATO budget
above the reference (issue: hardening)."""

from __future__ import annotations

import json
import logging

import pytest

from strato_peft.cli import main as cli
from strato_peft.config import ConfigError, load_config
from strato_peft.config.schema import SEED_MAX, DeviceInfoConfig
from strato_peft.dry_run import dry_run_report, format_report
from strato_peft.platform import PlatformError, choose_precision
from tests.conftest import CONFIGS

TINY = str(CONFIGS / "experiments" / "tiny_lora.yaml")
TINY_STRATO = str(CONFIGS / "experiments" / "tiny_strato.yaml")


def _dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli(["--config", TINY, "--dry-run", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- seed ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**63])
def test_a_seed_numpy_cannot_take_fails_the_dry_run(
    capsys: pytest.CaptureFixture[str], seed: int
) -> None:
    # Before: the dry run printed its report; the real run failed in np.random.seed.
    code, out, err = _dry_run(capsys, "--seed", str(seed))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("config error: --seed: invalid value for 'seed'") and str(seed) in err


def test_a_bad_seed_override_names_where_it_was_set() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^--override: invalid value for 'seed': .* greater than or equal to 0 \(got -5\)",
    ):
        load_config(TINY, ["seed=-5"])


@pytest.mark.parametrize("seed", [0, SEED_MAX])
def test_the_ends_of_numpy_seed_range_are_accepted(seed: int) -> None:
    import numpy as np

    assert load_config(TINY, seed=seed).seed == seed
    np.random.seed(seed)  # what accelerate's set_seed calls


# -- precision -------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_off_with_a_half_precision_fails_the_dry_run(
    capsys: pytest.CaptureFixture[str], precision: str
) -> None:
    # Before: the dry run printed "(not usable here: ...)" and exit 0; the real run refused.
    code, out, err = _dry_run(
        capsys,
        "--override", f"device_info.precision={precision}",
        "--override", "device_info.mixed_precision=false",
    )  # fmt: skip
    assert code == 2 and out == "" and "Traceback" not in err
    assert "invalid value for 'device_info'" in err
    assert f"device_info.precision={precision} needs device_info.mixed_precision=true" in err


def test_half_precision_on_mps_fails_the_config() -> None:
    with pytest.raises(ConfigError, match=r"device_info.precision=fp16: mixed precision is not"):
        load_config(TINY, ["device_info.device_type=mps", "device_info.precision=fp16"])


@pytest.mark.parametrize(
    ("settings", "platform"),
    [
        ({"mixed_precision": False, "precision": "bf16"}, "cpu"),
        ({"mixed_precision": False, "precision": "fp16"}, "cuda"),
        ({"device_type": "mps", "precision": "bf16"}, "mps"),
    ],
)
def test_the_config_rejects_what_the_platform_code_rejects(
    settings: dict[str, object], platform: str
) -> None:
    """The property: whatever the schema lets through, choose_precision does not refuse
    for a reason that does not depend on the machine."""
    with pytest.raises(ValueError, match=r"device_info\.precision"):
        DeviceInfoConfig(**settings)  # type: ignore[arg-type]
    built = DeviceInfoConfig.model_construct(**settings)  # unvalidated, as before the check
    with pytest.raises(PlatformError):
        choose_precision(platform, built)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [
        {"mixed_precision": False, "precision": "fp32"},
        {"mixed_precision": False, "precision": "auto"},
        {"mixed_precision": True, "precision": "bf16"},
        {"device_type": "mps", "precision": "fp32"},
    ],
)
def test_precision_combinations_a_run_accepts_stay_valid(settings: dict[str, object]) -> None:
    DeviceInfoConfig(**settings)  # type: ignore[arg-type]


# -- STRATO budget above the reference -------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [("peft.strato.budget.params=1.5", "params"), ("peft.strato.budget.flops=2", "flops")],
)
def test_a_budget_above_one_is_warned_and_listed_by_the_dry_run(
    caplog: pytest.LogCaptureFixture, override: str, key: str
) -> None:
    # Before: accepted in silence.
    with caplog.at_level(logging.WARNING):
        config = load_config(TINY_STRATO, [override])
    expected = f"peft.strato.budget.{key}="
    assert expected in caplog.text and "is above 1" in caplog.text
    report = dry_run_report(config)
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith(expected)
    assert f"warning          {expected}" in format_report(report)


def test_a_budget_within_the_reference_has_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = load_config(TINY_STRATO, ["peft.strato.budget.params=1.0"])
    assert "budget" not in caplog.text and dry_run_report(config)["warnings"] == []


def test_the_json_dry_run_lists_the_budget_warning(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config", TINY_STRATO, "--dry-run", "--json"]
    code = cli([*args, "--override", "peft.strato.budget.params=70"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["warnings"][0].startswith("peft.strato.budget.params=70 is above 1")
