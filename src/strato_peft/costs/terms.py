"""What the cost model prices besides the allocation: a method's cost terms and the run's settings.

:class:`CostTerms` says what an adapter adds beyond plain LoRA's ``A`` and ``B``
(a magnitude vector, singular values, a regulariser). Each PEFT method declares
its own terms (``Method.cost_terms``) and the cost model prices the terms, never
a method's name: DoRA is ``CostTerms(magnitude_vector=True)``, AdaLoRA is
``CostTerms(singular_values=True, orthogonality_regularizer=True)``, and a method
that is LoRA as far as costs go (rsLoRA, a rank schedule, STRATO's allocations)
is ``CostTerms()``. A new method with a new kind of overhead adds a field here
and its pricing in :mod:`.flops`, :mod:`.memory` or :func:`.report.trainable_params`,
not a branch on its name; a method whose overheads are already fields just
declares them.

:class:`CostSettings` holds the shape of a training step (batch, sequence,
micro-batches), the dtypes, the optimizer and the switches that change what
autograd runs and saves; every pricing function takes it in one argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strato_peft.costs.allocation import _peft_adapter_modules

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "float32": 4, "tf32": 4,
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
    "int8": 1, "fp8": 1, "nf4": 0.5, "int4": 0.5, "fp4": 0.5,
}  # fmt: skip
"""Bytes per element of the dtype names the cost model accepts."""
OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1}
"""fp32 states the optimizer keeps per trainable parameter."""
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa", "flash_attention_2")
"""Attention kernels whose saved activations :mod:`.memory` models."""


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a dtype name (``"bf16"``, ``"torch.float32"``, ``"nf4"``, ...)."""
    key = str(dtype).removeprefix("torch.").lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class CostTerms:
    """What an adapter adds beyond plain LoRA's A and B, as the cost model prices it.

    Each PEFT method declares its own (``Method.cost_terms``); the cost model never
    asks a method's name. The default, no extra term, is plain LoRA.
    """

    magnitude_vector: bool = False
    """DoRA (Liu et al. 2024, arXiv:2402.09353): ``+ d_out`` params per module; the
    column norm ``||W + s B A||`` is built per forward call (peft ``DoraLinearLayer``);
    with ``lora_dropout > 0`` the base output is recomputed on the dropped-out input;
    the base and LoRA outputs are saved for the magnitude's gradient; under gradient
    checkpointing the whole layer re-runs."""
    singular_values: bool = False
    """AdaLoRA (Zhang et al. 2023, arXiv:2303.10512): ``+ r`` params per module (the
    singular values ``E``); ``B``'s matmul no longer closes the module."""
    orthogonality_regularizer: bool = False
    """AdaLoRA's ``||A A^T - I|| + ||B^T B - I||`` term, added to the loss once per
    forward call. peft adds it only through ``PeftModelForCausalLM``
    (``task_type="CAUSAL_LM"``), not through a bare ``PeftModel``."""

    @property
    def plain_lora(self) -> bool:
        """True when ``B``'s matmul closes the module (no magnitude vector, no singular values).

        Gradient checkpointing's recomputation then stops before that matmul
        (:func:`strato_peft.costs.flops._not_recomputed`).
        """
        return not (self.magnitude_vector or self.singular_values)


@dataclass(frozen=True)
class CostSettings:
    """The training step the cost model prices, validated on construction.

    ``activation_dtype=None`` means the weights' dtype (no autocast). ``lora_dropout > 0``
    changes what is saved and, with a magnitude vector, what is computed.
    ``input_requires_grad=True`` models ``model.enable_input_require_grads()`` (which
    HF's ``gradient_checkpointing_enable`` calls): the embedding output then requires a
    gradient and the backward runs through every layer.
    """

    batch_size: int = 1
    seq_len: int = 512
    grad_accum_steps: int = 1
    weight_dtype: str = "bf16"
    activation_dtype: str | None = None
    adapter_dtype: str = "fp32"
    optimizer: str = "adamw"
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False
    input_requires_grad: bool = False
    attn_implementation: str = "eager"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_STATES:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZER_STATES)}"
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attn_implementation {self.attn_implementation!r}; "
                f"known: {', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        for dtype in (self.weight_dtype, self.activation_dtype, self.adapter_dtype):
            if dtype is not None:
                dtype_bytes(dtype)

    @property
    def resolved_activation_dtype(self) -> str:
        """The dtype activations are saved in: ``activation_dtype``, else the weights'."""
        return self.activation_dtype or self.weight_dtype

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.batch_size * self.seq_len


PLAIN_LORA = CostTerms()
"""No term beyond ``A`` and ``B``: the pricing functions' default (a frozen value, safe to share)."""
DEFAULT_SETTINGS = CostSettings()
"""``CostSettings()``: the pricing functions' default (a frozen value, safe to share)."""


def cost_terms_of_peft_model(peft_model: Any, adapter_name: str = "default") -> CostTerms:
    """The cost terms of an instantiated peft model, read from its adapter modules.

    A ``lora_E`` parameter means AdaLoRA's singular values; its orthogonality
    regulariser counts unless the model is a bare ``PeftModel``, which calls the base
    model directly and skips ``AdaLoraModel.forward``. A ``lora_magnitude_vector``
    holding ``adapter_name`` means DoRA's magnitude vector. The first adapted module
    decides (peft configures all modules of an adapter alike); no adapter module
    reads as plain LoRA.
    """
    for _, module in _peft_adapter_modules(peft_model, adapter_name):
        if hasattr(module, "lora_E"):
            return CostTerms(
                singular_values=True,
                orthogonality_regularizer=type(peft_model).__name__ != "PeftModel",
            )
        magnitude = getattr(module, "lora_magnitude_vector", None)
        return CostTerms(magnitude_vector=magnitude is not None and adapter_name in magnitude)
    return CostTerms()
