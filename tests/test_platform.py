"""Platform detection and precision choice; absent hardware is mocked."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from strato_peft.config.schema import DeviceInfoConfig
from strato_peft.platform import PlatformError, available_platforms, select_platform


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Make torch report a GPU: ``fake_gpu(hip=..., bf16=...)``."""

    def install(hip: str | None = None, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
        monkeypatch.setattr(torch.version, "hip", hip)

    return install


@pytest.fixture
def fake_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends, "mps", SimpleNamespace(is_available=lambda: True))


def test_cpu_only_machine_picks_cpu_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends, "mps", SimpleNamespace(is_available=lambda: False))
    assert available_platforms() == ["cpu"]
    p = select_platform(DeviceInfoConfig())
    assert (p.name, p.device, p.precision, p.use_grad_scaler) == ("cpu", "cpu", "fp32", False)
    assert p.accelerate_mixed_precision == "no"


def test_cuda_with_bf16(fake_gpu, caplog: pytest.LogCaptureFixture) -> None:
    fake_gpu(bf16=True)
    with caplog.at_level(logging.INFO):
        p = select_platform(DeviceInfoConfig())
    assert (p.name, p.device, p.precision) == ("cuda", "cuda:0", "bf16")
    assert p.torch_dtype() is torch.bfloat16
    assert "precision: bf16 (the device supports bfloat16)" in caplog.text


def test_cuda_without_bf16_uses_fp16_with_scaler(fake_gpu) -> None:
    fake_gpu(bf16=False)
    p = select_platform(DeviceInfoConfig())
    assert p.precision == "fp16" and p.use_grad_scaler and p.accelerate_mixed_precision == "fp16"


def test_rocm_is_told_apart_by_hip(fake_gpu) -> None:
    fake_gpu(hip="6.2.41133", bf16=True)
    assert available_platforms()[0] == "rocm"
    p = select_platform(DeviceInfoConfig(device_type="rocm", gpu_ids=[1]))
    assert (p.name, p.device, p.precision) == ("rocm", "cuda:1", "bf16")
    with pytest.raises(PlatformError, match="'cuda' was requested"):
        select_platform(DeviceInfoConfig(device_type="cuda"))


def test_mps_uses_fp32(monkeypatch: pytest.MonkeyPatch, fake_mps) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = select_platform(DeviceInfoConfig())
    assert (p.name, p.precision) == ("mps", "fp32")
    with pytest.raises(PlatformError, match="not supported on mps"):
        select_platform(DeviceInfoConfig(precision="bf16"))


def test_missing_platform_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends, "mps", SimpleNamespace(is_available=lambda: False))
    for name in ("cuda", "rocm", "mps"):
        with pytest.raises(PlatformError, match=f"'{name}' was requested.*available: cpu"):
            select_platform(DeviceInfoConfig(device_type=name))  # type: ignore[arg-type]
    with pytest.raises(PlatformError):
        select_platform(DeviceInfoConfig(), override="cuda")


def test_mixed_precision_off_forces_fp32(fake_gpu) -> None:
    fake_gpu(bf16=True)
    p = select_platform(DeviceInfoConfig(mixed_precision=False))
    assert p.precision == "fp32" and "mixed_precision is false" in p.reason
    # the config itself refuses the contradiction now (so the dry run does too)
    with pytest.raises(ValueError, match=r"needs device_info\.mixed_precision=true"):
        DeviceInfoConfig(mixed_precision=False, precision="bf16")


def test_explicit_bf16_on_a_gpu_without_it_fails(fake_gpu) -> None:
    fake_gpu(bf16=False)
    with pytest.raises(PlatformError, match="no bf16 support"):
        select_platform(DeviceInfoConfig(precision="bf16"))
    assert select_platform(DeviceInfoConfig(precision="fp16")).precision == "fp16"
