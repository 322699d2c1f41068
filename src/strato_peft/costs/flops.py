"""FLOPs of one training micro-step (forward + backward) of a Llama model with adapters.

Counting convention: matrix multiplications only, 2 FLOPs per multiply-add,
which is what ``torch.utils.flop_counter.FlopCounterMode`` counts; norms,
activations, softmax and the loss are elementwise and left out (under 1% at
these sizes).

Per token, for a linear layer ``y = x W^T`` (``W``: ``d_out x d_in``) with a
rank-``r`` adapter ``y += s B A x``:

* forward: base ``2 d_in d_out``, adapter ``2 r (d_in + d_out)``;
* backward: the frozen base contributes only an input gradient,
  ``2 d_in d_out`` if ``x`` requires a gradient and 0 otherwise; the adapter
  contributes weight gradients ``2 r (d_in + d_out)`` always, plus the input
  gradient ``2 r (d_in + d_out)`` of ``B`` and, if ``x`` requires a gradient,
  of ``A`` (``2 r d_in``).

Whether a tensor requires a gradient is propagated through each decoder layer
exactly as autograd does: the hidden state requires one only above the lowest
adapted layer (DESIGN.md section 4), so layers below it cost forward FLOPs
only, and inside the lowest adapted layer only the paths fed by an adapter are
differentiated (e.g. with only ``v_proj`` adapted there, the score matrix
``Q K^T`` gets no backward).

Attention scores: eager attention computes the full ``S x S`` matrices
``Q K^T`` and ``P V``: ``4 S n_heads head_dim`` FLOPs per token per layer; the
backward of each product costs the same again per operand that requires a
gradient. A causal flash kernel skips about half of it; FlopCounterMode counts
it in full, and so does this model.

The lm_head costs ``2 h V`` per token forward and the same again backward (its
input gradient) once any adapter exists; the embedding lookup is a gather
(no FLOPs) and gets no gradient.

Terms beyond plain LoRA, as a method declares them in its
:class:`~strato_peft.costs.terms.CostTerms`, per adapted module and per forward
call (not per token):

* magnitude vector (DoRA, Liu et al. 2024, arXiv:2402.09353; peft
  ``DoraLinearLayer``): the column norm ``||W + s B A||`` needs ``B A``, which peft builds as
  ``B(A(I_{d_in}))``: ``2 d_in^2 r + 2 d_in r d_out`` FLOPs, detached (no
  backward). With ``lora_dropout > 0`` peft also recomputes the base output on
  the dropped-out input: another ``2 d_in d_out`` per token forward and
  backward (if ``x`` requires a gradient).
* orthogonality regulariser (AdaLoRA, Zhang et al. 2023, arXiv:2303.10512):
  ``||A A^T - I|| + ||B^T B - I||`` costs ``2 r^2 (d_in + d_out)`` forward and
  twice that backward. AdaLoRA's singular values are still multiplied where
  masked, so FLOPs follow the allocated rank; their elementwise product adds
  no matmul FLOPs.

Gradient checkpointing re-runs the forward of every layer the backward passes
through (non-reentrant checkpointing, HF's default), less the closing matmul
it does not need (see ``_not_recomputed``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from strato_peft.costs.allocation import resolve_allocation
from strato_peft.costs.architecture import MODULE_TYPES, Architecture
from strato_peft.costs.terms import DEFAULT_SETTINGS, PLAIN_LORA, CostSettings, CostTerms


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one micro-batch (``batch_size x seq_len`` tokens), split by pass and by owner."""

    forward_base: float
    forward_adapter: float
    backward_base: float
    backward_adapter: float
    recompute: float = 0.0
    """Forward re-run by gradient checkpointing (base and adapter together)."""

    @property
    def forward(self) -> float:
        return self.forward_base + self.forward_adapter

    @property
    def backward(self) -> float:
        return self.backward_base + self.backward_adapter

    @property
    def adapter(self) -> float:
        return self.forward_adapter + self.backward_adapter

    @property
    def train(self) -> float:
        """Forward + backward (+ recomputation): one micro-step of training."""
        return self.forward + self.backward + self.recompute


class _Tally:
    """Per-token FLOPs accumulated over the layers, by pass and by owner."""

    def __init__(self) -> None:
        self.fwd_base = 0.0
        self.fwd_adapter = 0.0
        self.bwd_base = 0.0
        self.bwd_adapter = 0.0

    def total_forward(self) -> float:
        """Forward FLOPs so far: what checkpointing's recomputation re-runs, layer by layer."""
        return self.fwd_base + self.fwd_adapter


def _linear(
    t: _Tally, d_in: int, d_out: int, rank: int, x_grad: bool, terms: CostTerms, dropout: bool
) -> bool:
    """Add one linear layer's per-token FLOPs; return whether its output requires a gradient."""
    base = 2.0 * d_in * d_out
    t.fwd_base += base
    if x_grad:
        t.bwd_base += base
    if rank == 0:
        return x_grad
    t.fwd_adapter += 2.0 * rank * (d_in + d_out)
    # weight grads of A and B, input grad of B, input grad of A when x needs one
    t.bwd_adapter += 2.0 * rank * (d_in + 2 * d_out) + (2.0 * rank * d_in if x_grad else 0.0)
    if terms.magnitude_vector and dropout:  # base output recomputed on the dropped-out input
        t.fwd_adapter += base
        if x_grad:
            t.bwd_adapter += base
    return True


def _per_call_overhead(
    d_in: int, d_out: int, rank: int, terms: CostTerms
) -> tuple[float, float, float]:
    """FLOPs per module and forward call that do not scale with tokens.

    Returns (forward inside the decoder layer, forward outside it, backward). Only
    what runs inside the layer is re-run by gradient checkpointing: DoRA's norm is
    built in the layer's forward, AdaLoRA's regulariser in the loss.
    """
    in_layer = outside = backward = 0.0
    if terms.magnitude_vector:  # the norm's B(A(I)), detached: no backward
        in_layer += 2.0 * d_in * d_in * rank + 2.0 * d_in * rank * d_out
    if terms.orthogonality_regularizer:
        outside += 2.0 * rank * rank * (d_in + d_out)
        backward += 2.0 * outside
    return in_layer, outside, backward


def _not_recomputed(arch: Architecture, down_rank: int, terms: CostTerms) -> float:
    """Per-token forward FLOPs closing a layer that checkpointing's recomputation skips.

    Non-reentrant ``torch.utils.checkpoint`` stops re-running a layer once the
    last tensor saved for the backward is rebuilt (early stop). Measured with
    FlopCounterMode: the closing matmul of down_proj (the frozen base, or
    LoRA's ``B``) is skipped; a magnitude vector (DoRA) or singular values
    (AdaLoRA) follow ``B`` with ops that save tensors, so their whole layer re-runs.
    """
    if down_rank == 0:
        return 2.0 * arch.intermediate_size * arch.hidden_size
    return 2.0 * down_rank * arch.hidden_size if terms.plain_lora else 0.0


def training_flops(
    arch: Architecture,
    allocation: Mapping[str, int],
    terms: CostTerms = PLAIN_LORA,
    settings: CostSettings = DEFAULT_SETTINGS,
) -> FlopCount:
    """FLOPs of one forward + backward on ``batch_size x seq_len`` tokens (see the module docstring).

    Of ``settings`` this reads the token shape, ``lora_dropout``,
    ``gradient_checkpointing`` and ``input_requires_grad`` (with it the backward
    runs through every layer); dtypes and the optimizer do not change FLOPs.
    """
    batch_size, seq_len = settings.batch_size, settings.seq_len
    ranks: dict[tuple[int, str], int] = {
        (slot.layer, slot.module_type): rank for slot, rank in resolve_allocation(arch, allocation)
    }
    tokens = float(batch_size * seq_len)
    dropout = settings.lora_dropout > 0
    t = _Tally()
    per_call_fwd = per_call_bwd = recompute = 0.0
    attn_product = (
        2.0 * seq_len * arch.num_attention_heads * arch.head_size
    )  # per token, per product
    grad = settings.input_requires_grad
    for layer in range(arch.num_hidden_layers):
        layer_start = t.total_forward()
        layer_calls = loss_calls = 0.0
        out: dict[str, bool] = {}
        for module_type in MODULE_TYPES:
            rank = ranks.get((layer, module_type), 0)
            d_in, d_out = arch.module_shape(module_type)
            if rank:
                in_layer, outside, bwd = _per_call_overhead(d_in, d_out, rank, terms)
                layer_calls += in_layer
                loss_calls += outside
                per_call_bwd += bwd
            if module_type in ("q_proj", "k_proj", "v_proj"):
                x_grad = grad
            elif module_type == "o_proj":
                q, k, v = out["q_proj"], out["k_proj"], out["v_proj"]
                t.fwd_base += 2 * attn_product
                t.bwd_base += attn_product * (
                    q + k
                )  # Q K^T: one product per operand needing a grad
                t.bwd_base += attn_product * ((q or k) + v)  # P V
                x_grad = q or k or v
            elif module_type in ("gate_proj", "up_proj"):
                x_grad = grad or out["o_proj"]
            else:
                x_grad = out["gate_proj"] or out["up_proj"]
            out[module_type] = _linear(t, d_in, d_out, rank, x_grad, terms, dropout)
        per_call_fwd += layer_calls + loss_calls
        grad = grad or out["o_proj"] or out["down_proj"]
        if settings.gradient_checkpointing and grad:
            skipped = _not_recomputed(arch, ranks.get((layer, "down_proj"), 0), terms)
            recompute += (t.total_forward() - layer_start - skipped) * tokens
            recompute += layer_calls  # per-call work built inside the layer (DoRA's norm)
    lm_head = 2.0 * arch.hidden_size * arch.vocab_size
    t.fwd_base += lm_head
    if grad:
        t.bwd_base += lm_head
    return FlopCount(
        forward_base=t.fwd_base * tokens,
        forward_adapter=t.fwd_adapter * tokens + per_call_fwd,
        backward_base=t.bwd_base * tokens,
        backward_adapter=t.bwd_adapter * tokens + per_call_bwd,
        recompute=recompute,
    )


def forward_flops(
    arch: Architecture,
    allocation: Mapping[str, int],
    terms: CostTerms = PLAIN_LORA,
    settings: CostSettings = DEFAULT_SETTINGS,
) -> float:
    """FLOPs of one forward pass (training mode) on ``batch_size x seq_len`` tokens.

    The forward does not depend on which inputs require a gradient, nor on checkpointing
    (its re-run is :attr:`FlopCount.recompute`, not part of the forward).
    """
    return training_flops(arch, allocation, terms, settings).forward
