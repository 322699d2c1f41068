"""Platform detection (cuda, rocm, mps, cpu) and the precision choice for each.

ROCm builds of torch expose AMD GPUs through the ``torch.cuda`` API; they are told apart
by ``torch.version.hip``. Asking for a platform that is not present is an error, never a
silent fallback: a run that was meant for a GPU must not quietly train on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from strato_peft.config.schema import DeviceInfoConfig

log = logging.getLogger(__name__)

PlatformName = Literal["cuda", "rocm", "mps", "cpu"]
DtypeName = Literal["bf16", "fp16", "fp32"]


class PlatformError(Exception):
    """The requested platform or precision is not available here."""


@dataclass(frozen=True)
class Platform:
    """The device a run uses and how it computes.

    ``precision`` is the autocast dtype (``fp32`` = no autocast); ``use_grad_scaler`` is
    true for fp16, whose small range needs loss scaling.
    """

    name: PlatformName
    device: str
    device_name: str
    precision: DtypeName
    reason: str

    @property
    def use_grad_scaler(self) -> bool:
        return self.precision == "fp16"

    @property
    def accelerate_mixed_precision(self) -> str:
        """The value ``accelerate.Accelerator(mixed_precision=...)`` expects."""
        return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.precision]

    def torch_dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            self.precision
        ]

    @property
    def supports_compile(self) -> bool:
        """Whether ``torch.compile`` (inductor) is supported: CUDA, ROCm and CPU, not MPS."""
        return self.name != "mps"

    def describe(self) -> str:
        return f"platform: {self.name} ({self.device_name}); precision: {self.precision} ({self.reason})"


def available_platforms() -> list[PlatformName]:
    """Platforms usable in this process, best first; ``cpu`` is always last."""
    import torch

    found: list[PlatformName] = []
    if torch.cuda.is_available():
        found.append("rocm" if getattr(torch.version, "hip", None) else "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def _device_name(name: PlatformName) -> str:
    import torch

    if name in ("cuda", "rocm"):
        return str(torch.cuda.get_device_name(0))
    if name == "mps":
        return "Apple GPU (Metal)"
    import platform as stdlib_platform

    return stdlib_platform.processor() or stdlib_platform.machine() or "CPU"


def _bf16_supported(name: PlatformName) -> bool:
    import torch

    if name in ("cuda", "rocm"):
        return bool(torch.cuda.is_bf16_supported())
    return False


def choose_precision(name: PlatformName, info: DeviceInfoConfig) -> tuple[DtypeName, str]:
    """Pick the compute dtype and say why.

    ``auto``: bf16 where the accelerator supports it, else fp16 with a gradient scaler,
    else fp32. On MPS autocast is not used (the spec's MPS setting), and on CPU fp32 is
    chosen because CPU autocast is slower than fp32 on CPUs without bf16 units.
    """
    if not info.mixed_precision:
        if info.precision not in ("auto", "fp32"):
            raise PlatformError(
                f"device_info.precision={info.precision} contradicts device_info.mixed_precision=false"
            )
        return "fp32", "device_info.mixed_precision is false"
    if info.precision != "auto":
        if info.precision == "bf16" and name in ("cuda", "rocm") and not _bf16_supported(name):
            raise PlatformError(
                f"device_info.precision=bf16 but this {name} device has no bf16 support"
            )
        if info.precision in ("bf16", "fp16") and name == "mps":
            raise PlatformError(
                "device_info.precision: mixed precision is not supported on mps; use fp32"
            )
        return info.precision, "set by device_info.precision"
    if name in ("cuda", "rocm"):
        if _bf16_supported(name):
            return "bf16", "the device supports bfloat16"
        return "fp16", "no bfloat16 on this device; fp16 with a gradient scaler"
    if name == "mps":
        return "fp32", "autocast is not used on mps"
    return "fp32", "cpu: fp32 is faster than autocast on CPUs without bf16 units"


def select_platform(info: DeviceInfoConfig, override: str | None = None) -> Platform:
    """Resolve ``device_info.device_type`` (or ``--platform``) to an available platform."""
    requested = override or info.device_type
    available = available_platforms()
    if requested == "auto":
        name = available[0]
    elif requested in available:
        name = requested
    else:
        raise PlatformError(
            f"platform '{requested}' was requested (--platform or device_info.device_type) but is "
            f"not available here; available: {', '.join(available)}"
        )
    precision, reason = choose_precision(name, info)
    if name in ("cuda", "rocm"):
        index = (info.gpu_ids or [0])[0]
        device = f"cuda:{index}"
    else:
        device = name
    platform = Platform(name, device, _device_name(name), precision, reason)
    log.info(platform.describe())
    return platform
