"""Architecture description of a Llama-family causal LM, from config fields alone.

Everything in :mod:`strato_peft.costs` works from these numbers, so it answers
instantly for 7B/13B models without loading (or even allocating) a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
MODULE_TYPES: tuple[str, ...] = ATTENTION_MODULES + MLP_MODULES


def module_name(layer: int, module_type: str) -> str:
    """The module's name inside a Hugging Face ``LlamaForCausalLM``.

    ``module_name(3, "q_proj") == "model.layers.3.self_attn.q_proj"``.
    """
    if module_type not in MODULE_TYPES:
        raise ValueError(f"unknown module type {module_type!r}; known: {', '.join(MODULE_TYPES)}")
    block = "self_attn" if module_type in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{module_type}"


class Slot(NamedTuple):
    """One adaptable linear layer: ``y = x W^T`` with ``W`` of shape ``(d_out, d_in)``."""

    layer: int
    module_type: str
    d_in: int
    d_out: int

    @property
    def name(self) -> str:
        return module_name(self.layer, self.module_type)


@dataclass(frozen=True)
class Architecture:
    """Shape of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral without sliding window).

    ``head_dim`` of 0 means ``hidden_size // num_attention_heads`` (see :attr:`head_size`).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = "custom"

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> Architecture:
        """Read the fields of a ``transformers`` ``LlamaConfig`` (or any config with the same names)."""
        heads = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_hidden_layers=int(config.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            vocab_size=int(config.vocab_size),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            head_dim=int(head_dim),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            name=name
            or str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "custom")),
        )

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_width(self) -> int:
        """Output width of q_proj (= input width of o_proj): ``n_heads * head_dim``."""
        return self.num_attention_heads * self.head_size

    @property
    def kv_width(self) -> int:
        """Output width of k_proj and v_proj: ``n_kv_heads * head_dim``."""
        return self.num_key_value_heads * self.head_size

    def module_shape(self, module_type: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of a linear module type."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if module_type not in shapes:
            raise ValueError(
                f"unknown module type {module_type!r}; known: {', '.join(MODULE_TYPES)}"
            )
        return shapes[module_type]

    def base_params(self) -> int:
        """Parameters of the frozen base model (tied embeddings counted once)."""
        h = self.hidden_size
        per_layer = 2 * h  # input and post-attention RMSNorm weights
        for module_type in MODULE_TYPES:
            d_in, d_out = self.module_shape(module_type)
            per_layer += d_in * d_out
            bias = self.attention_bias if module_type in ATTENTION_MODULES else self.mlp_bias
            if bias:
                per_layer += d_out
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer + h


def adaptable_slots(
    arch: Architecture,
    target_modules: tuple[str, ...] | list[str] = MODULE_TYPES,
    layers: range | list[int] | None = None,
) -> list[Slot]:
    """Every ``(layer, module_type, d_in, d_out)`` slot an adapter can be placed in, layer-major."""
    unknown = [m for m in target_modules if m not in MODULE_TYPES]
    if unknown:
        raise ValueError(f"unknown module types {unknown}; known: {', '.join(MODULE_TYPES)}")
    chosen = range(arch.num_hidden_layers) if layers is None else layers
    return [
        Slot(layer, m, *arch.module_shape(m))
        for layer in chosen
        for m in MODULE_TYPES
        if m in target_modules
    ]


# Published configs (config.json of the hub repositories), so tables need no download.
LLAMA2_7B = Architecture(4096, 11008, 32, 32, 32, 32000, name="Llama-2-7B")
LLAMA2_13B = Architecture(5120, 13824, 40, 40, 40, 32000, name="Llama-2-13B")
SMOLLM2_135M = Architecture(
    576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True, name="SmolLM2-135M"
)
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "llama-2-7b": LLAMA2_7B,
    "llama-2-13b": LLAMA2_13B,
    "smollm2-135m": SMOLLM2_135M,
}
