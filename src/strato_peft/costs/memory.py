"""Training memory of a Llama model with adapters, by component, from shapes alone.

``total = frozen_weights + adapter_params + gradients + optimizer_states + activations + logits``

* frozen weights: ``base_params x bytes(weight_dtype)``;
* adapter params and their gradients: ``trainable x bytes(adapter_dtype)``
  (peft keeps adapters in fp32 by default, ``autocast_adapter_dtype=True``);
* optimizer states: ``trainable x 4 x n_states`` (AdamW: 2 fp32 states);
* activations: the tensors autograd saves for the backward, counted op by op
  for HF's eager Llama layer with the same requires-grad propagation as
  :mod:`strato_peft.costs.flops`, so layers below the lowest adapter save
  nothing (``B S`` = tokens, ``e`` = bytes of the activation dtype, ``a`` = of
  the adapter dtype):

  - RMSNorm on an input needing a gradient: its fp32 copy and rsqrt, ``4 (h + 1)``;
  - adapter on ``x`` (width ``d_in``): ``x`` (shared by q/k/v, or gate/up, when
    ``a == e`` and no dropout; else one ``a``-byte copy each, plus a 1-byte
    mask with dropout) and ``A x`` (``r a``); a magnitude vector (DoRA) also
    keeps the base and LoRA outputs for the magnitude's gradient, ``d_out (e + a)``;
  - eager attention: ``Q`` if ``K`` needs a gradient, ``K`` if ``Q`` does
    (``n_heads head_dim e`` each, after repeat_kv), the fp32 softmax output
    ``4 n_heads S`` when the scores need a gradient, its ``e``-byte copy when
    ``V`` does, and ``V`` when the scores do; SDPA/flash instead keep
    ``Q, K, V``, the output and a logsumexp (no ``S x S`` term);
  - SwiGLU MLP: ``gate``, ``silu(gate)`` and ``up`` (``I e`` each) when needed.

  With gradient checkpointing, each layer on the backward path keeps only its
  input (``h e``) and one layer's activations exist at a time during the
  recomputation.
* logits: ``B S V (e + 4 + 4)``: the logits, their fp32 upcast in the loss
  and the saved fp32 log-softmax (``B S V 8`` when ``e`` is already 4 bytes).

Where the eager model applies, this equals what ``saved_tensors_hooks``
records on a real step (tested); the peak on a GPU adds allocator slack and
the transient buffers of the backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from strato_peft.costs.allocation import resolve_allocation
from strato_peft.costs.architecture import Architecture
from strato_peft.costs.terms import (
    DEFAULT_SETTINGS,
    OPTIMIZER_STATES,
    PLAIN_LORA,
    CostSettings,
    CostTerms,
    dtype_bytes,
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component; :attr:`total` is their sum."""

    frozen_weights: float
    adapter_params: float
    gradients: float
    optimizer_states: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, int]:
        """Whole bytes per component: the ``memory_breakdown`` of the JSON reports."""
        return {key: round(value) for key, value in asdict(self).items()}


def _adapter_input(d_in: int, ranks: list[int], e: float, a: float, dropout: bool) -> float:
    """Bytes per token saved by adapters that share one input of width ``d_in``."""
    adapted = [r for r in ranks if r]
    if not adapted:
        return 0.0
    if dropout:
        inputs = len(adapted) * d_in * (a + 1)
    elif a != e:
        inputs = len(adapted) * d_in * a
    else:
        inputs = d_in * e
    return inputs + sum(r * a for r in adapted)


def _layer_activations(
    arch: Architecture,
    rank: dict[str, int],
    grad_in: bool,
    terms: CostTerms,
    e: float,
    a: float,
    seq_len: int,
    dropout: bool,
    attn_implementation: str,
) -> tuple[float, bool]:
    """(saved bytes per token, output requires grad) for one decoder layer."""
    h, inter = arch.hidden_size, arch.intermediate_size
    heads, qw, kvw = arch.num_attention_heads, arch.q_width, arch.kv_width
    r = {
        m: rank.get(m, 0)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    saved = 4.0 * (h + 1) if grad_in else 0.0
    saved += _adapter_input(h, [r["q_proj"], r["k_proj"], r["v_proj"]], e, a, dropout)
    q, k, v = (grad_in or r[m] > 0 for m in ("q_proj", "k_proj", "v_proj"))
    scores = q or k
    if attn_implementation == "eager":
        saved += qw * e * (k + q)
        saved += 4.0 * heads * seq_len if scores else 0.0
        saved += heads * seq_len * e if v and (e != 4 or not scores) else 0.0
        saved += qw * e if scores else 0.0
    elif q or k or v:
        saved += (2 * qw + 2 * kvw) * e + 4.0 * heads
    attn_out = q or k or v
    saved += _adapter_input(qw, [r["o_proj"]], e, a, dropout)
    hidden = grad_in or attn_out or r["o_proj"] > 0
    saved += 4.0 * (h + 1) if hidden else 0.0
    saved += _adapter_input(h, [r["gate_proj"], r["up_proj"]], e, a, dropout)
    gate, up = hidden or r["gate_proj"] > 0, hidden or r["up_proj"] > 0
    saved += inter * e * (2 * gate + up)
    saved += _adapter_input(inter, [r["down_proj"]], e, a, dropout)
    if terms.magnitude_vector:  # base and LoRA outputs, for the magnitude's gradient
        saved += sum(arch.module_shape(m)[1] * (e + a) for m, rk in r.items() if rk)
    return saved, hidden or gate or up or r["down_proj"] > 0


def activation_bytes(
    arch: Architecture,
    allocation: Mapping[str, int],
    terms: CostTerms = PLAIN_LORA,
    settings: CostSettings = DEFAULT_SETTINGS,
) -> float:
    """Bytes autograd saves for the backward in the decoder stack and final norm (logits apart).

    Activations are saved in ``settings.resolved_activation_dtype`` (the weights'
    dtype unless ``activation_dtype`` is set); the optimizer does not enter.
    """
    batch_size, seq_len = settings.batch_size, settings.seq_len
    e = dtype_bytes(settings.resolved_activation_dtype)
    a = dtype_bytes(settings.adapter_dtype)
    ranks: dict[int, dict[str, int]] = {}
    for slot, rk in resolve_allocation(arch, allocation):
        ranks.setdefault(slot.layer, {})[slot.module_type] = rk
    tokens = batch_size * seq_len
    grad = settings.input_requires_grad
    per_layer: list[float] = []
    for layer in range(arch.num_hidden_layers):
        grad_in = grad
        saved, grad = _layer_activations(
            arch,
            ranks.get(layer, {}),
            grad_in,
            terms,
            e,
            a,
            seq_len,
            settings.lora_dropout > 0,
            settings.attn_implementation,
        )
        if saved:
            per_layer.append(saved * tokens)
    if settings.gradient_checkpointing and per_layer:
        stack = len(per_layer) * arch.hidden_size * e * tokens + max(per_layer)
    else:
        stack = sum(per_layer)
    if grad:  # final norm, and cos/sin of the rotary embedding (shared by all layers)
        stack += 4.0 * (arch.hidden_size + 1) * tokens + 2 * seq_len * arch.head_size * e
    return stack


def logits_bytes(arch: Architecture, batch_size: int, seq_len: int, activation_dtype: str) -> float:
    """``B S V (e + 4 + 4)``: logits, their fp32 upcast and the saved log-softmax (see module doc)."""
    e = dtype_bytes(activation_dtype)
    return batch_size * seq_len * arch.vocab_size * (e + (4 if e != 4 else 0) + 4)


def memory_estimate(
    arch: Architecture,
    allocation: Mapping[str, int],
    terms: CostTerms,
    trainable_params: int,
    settings: CostSettings = DEFAULT_SETTINGS,
) -> MemoryEstimate:
    """Memory of one training step by component (see the module docstring for each formula).

    ``trainable_params`` is :func:`strato_peft.costs.trainable_params` of the same
    allocation and terms (passed in, not recomputed, so callers price it once).
    """
    a = dtype_bytes(settings.adapter_dtype)
    act_dtype = settings.resolved_activation_dtype
    return MemoryEstimate(
        frozen_weights=arch.base_params() * dtype_bytes(settings.weight_dtype),
        adapter_params=trainable_params * a,
        gradients=trainable_params * a,
        optimizer_states=trainable_params * 4.0 * OPTIMIZER_STATES[settings.optimizer],
        activations=activation_bytes(arch, allocation, terms, settings),
        logits=logits_bytes(arch, settings.batch_size, settings.seq_len, act_dtype),
    )
