"""Change the rank of a ``peft`` LoRA (or DoRA) layer in place, optimizer state included.

A LoRA layer adds ``s B A x`` with ``A in R^{r x d_in}``, ``B in R^{d_out x r}`` and
``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). Resizing keeps the same
``nn.Parameter`` objects (only ``param.data`` changes shape), so the optimizer's
``param_groups`` stay valid, and keeps ``s`` constant: ``lora_alpha`` becomes
``s r'`` (``s sqrt(r')``), so a resize changes the update only as described below and
the surviving components keep their learning dynamics. The saved adapter records the
per-module ``alpha`` in ``alpha_pattern``.

- **grow** ``r -> r' > r``: append ``r' - r`` components with ``B = 0`` and ``A``
  initialised as peft does (Kaiming-uniform, ``a = sqrt(5)``; or Gaussian with std
  ``1 / r'``): the output is unchanged. Optimizer moments of the new components are zero,
  those of the existing ones untouched.
- **shrink** ``r -> k < r``: the best rank-k approximation of ``B A`` (Eckart-Young):
  with ``B A = U S V^T``, ``A' = V_k^T`` and ``B' = U_k S_k``, so
  ``||s (B A - B' A')||_F = s ||S_{k:}||_2``. The SVD comes from QR factors of ``B``
  and ``A^T`` and an ``r x r`` SVD, never the ``d_out x d_in`` product. The new factors
  are linear maps of the old ones (``A' = N A``, ``B' = B P`` with ``N = A' A^+``,
  ``P = B^+ B'``); the moments follow the same maps (first moments linearly, second
  moments through the squared maps, a diagonal approximation). When the factors already
  are in this SVD form (as after a previous shrink), ``N`` and ``P`` are signed
  selections: the shrink then just drops the least important existing components and
  keeps the parameters and moments of the kept ones bit for bit.
- **rank 0**: zero-size factors, and the layer's adapters disabled
  (peft's ``enable_adapters(False)``), so the layer computes its base output only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER = "default"
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Resize:
    """What one resize did; ``dropped`` holds the discarded singular values of ``B A``."""

    name: str
    old_rank: int
    new_rank: int
    dropped: torch.Tensor | None = None


def lora_layers(model: nn.Module, adapter: str = ADAPTER) -> Iterator[tuple[str, Any]]:
    """``(name, layer)`` of every LoRA/DoRA linear layer; names as in the base model
    (``model.layers.0.self_attn.q_proj``), the keys of ``rank_pattern``. AdaLoRA's layers
    (``lora_A`` a ``ParameterDict``) are not resizable and are skipped."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if (
            isinstance(lora_a, nn.ModuleDict)
            and adapter in lora_a
            and isinstance(lora_a[adapter], nn.Linear)
            and hasattr(module, "r")
        ):
            yield name.removeprefix(_PREFIX), module


def module_ranks(model: nn.Module, adapter: str = ADAPTER) -> dict[str, int]:
    """Module name -> current rank (the shape of ``A``)."""
    return {name: int(layer.lora_A[adapter].weight.shape[0]) for name, layer in lora_layers(model)}


def rank_cost(layer: Any) -> int:
    """Trainable params per unit of rank: ``d_in + d_out``."""
    return int(layer.in_features + layer.out_features)


def resize_layer(
    layer: Any,
    new_rank: int,
    *,
    name: str = "",
    adapter: str = ADAPTER,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    init: bool | str = True,
) -> Resize:
    """Set the rank of one LoRA layer to ``new_rank`` (see the module docstring)."""
    if new_rank < 0:
        raise ValueError(f"{name or 'layer'}: rank must be >= 0, got {new_rank}")
    a_param = layer.lora_A[adapter].weight
    b_param = layer.lora_B[adapter].weight
    old = int(a_param.shape[0])
    if new_rank == old:
        return Resize(name, old, old)
    if layer.lora_B[adapter].bias is not None:
        raise ValueError(f"{name}: resizing a LoRA layer with lora_bias is not supported")
    if new_rank == 0 and layer.use_dora.get(adapter, False):
        raise ValueError(f"{name}: a DoRA layer keeps rank >= 1 (its magnitude needs a direction)")
    dropped = None
    with torch.no_grad():
        if new_rank > old:
            extra = torch.empty(new_rank - old, a_param.shape[1], dtype=torch.float32)
            if init is True:
                nn.init.kaiming_uniform_(extra, a=math.sqrt(5), generator=generator)
            elif init == "gaussian":
                nn.init.normal_(extra, std=1 / new_rank, generator=generator)
            else:
                raise ValueError(f"growing a LoRA layer initialised with {init!r} is not supported")
            extra = extra.to(a_param)
            new_a = torch.cat([a_param.data, extra], 0)
            new_b = torch.cat(
                [b_param.data, b_param.new_zeros(b_param.shape[0], new_rank - old)], 1
            )
            _pad_state(optimizer, a_param, new_rank - old, dim=0)
            _pad_state(optimizer, b_param, new_rank - old, dim=1)
        else:
            new_a, new_b, n_map, p_map, dropped = _truncate(a_param.data, b_param.data, new_rank)
            _map_state(optimizer, a_param, n_map, left=True)
            _map_state(optimizer, b_param, p_map, left=False)
        a_param.data = new_a
        b_param.data = new_b
        a_param.grad = None
        b_param.grad = None
    layer.lora_A[adapter].out_features = new_rank
    layer.lora_B[adapter].in_features = new_rank
    scaling = layer.scaling[adapter]
    layer.r[adapter] = new_rank
    if new_rank:
        unit = math.sqrt(new_rank) if layer.use_rslora.get(adapter, False) else new_rank
        layer.lora_alpha[adapter] = scaling * unit
    if (new_rank == 0) != (old == 0):
        layer.enable_adapters(new_rank > 0)
    return Resize(name, old, new_rank, dropped)


def _truncate(
    a: torch.Tensor, b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k factors of ``b @ a``, the maps ``N`` (k x r), ``P`` (r x k) with
    ``a' = N a``, ``b' = b P``, and the dropped singular values."""
    a64, b64 = a.double(), b.double()
    q_b, r_b = torch.linalg.qr(b64)
    q_a, r_a = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    new_a = (q_a @ vh.T)[:, :k].T
    new_b = (q_b @ u)[:, :k] * s[:k]
    n_map = new_a @ torch.linalg.pinv(a64)
    signs = torch.where(torch.diagonal(n_map[:, : min(k, n_map.shape[1])]) < 0, -1.0, 1.0)
    signs = torch.cat([signs, signs.new_ones(k - signs.numel())]).to(n_map)
    new_a, new_b, n_map = new_a * signs[:, None], new_b * signs, n_map * signs[:, None]
    p_map = torch.linalg.pinv(b64) @ new_b
    selection = _signed_selection(n_map)
    if selection is not None and _signed_selection(p_map.T) is not None:
        # Already in SVD form: keep the existing components exactly.
        n_map = selection.to(n_map)
        p_map = n_map.T.clone()
        return (n_map @ a64).to(a), (b64 @ p_map).to(b), n_map, p_map, s[k:]
    return new_a.to(a), new_b.to(b), n_map, p_map, s[k:]


def _signed_selection(matrix: torch.Tensor, tol: float = 1e-3) -> torch.Tensor | None:
    """``matrix`` rounded to a signed selection (one +-1 per row, distinct columns), if close."""
    rounded = matrix.round()
    if matrix.numel() == 0 or (matrix - rounded).abs().max() > tol:
        return None
    nonzero = rounded != 0
    if not bool((nonzero.sum(1) == 1).all() and (nonzero.sum(0) <= 1).all()):
        return None
    return rounded


def _state(optimizer: torch.optim.Optimizer | None, param: nn.Parameter) -> dict[str, Any]:
    if optimizer is None:
        return {}
    state: dict[str, Any] = optimizer.state.get(param, {})
    return state


def _moments(state: dict[str, Any], param: nn.Parameter) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0:
            yield key, value


def _pad_state(
    optimizer: torch.optim.Optimizer | None, param: nn.Parameter, extra: int, dim: int
) -> None:
    state = _state(optimizer, param)
    for key, value in list(_moments(state, param)):
        shape = list(value.shape)
        shape[dim] = extra
        state[key] = torch.cat([value, value.new_zeros(shape)], dim)


def _map_state(
    optimizer: torch.optim.Optimizer | None,
    param: nn.Parameter,
    mapping: torch.Tensor,
    left: bool,
) -> None:
    """Moments follow ``A' = N A`` (``left``) or ``B' = B P``: ``m' = N m``, ``v' = N^2 v``."""
    state = _state(optimizer, param)
    for key, value in list(_moments(state, param)):
        linear = key != "exp_avg_sq" and key != "max_exp_avg_sq"
        m = mapping if linear else mapping.square()
        v = value.double()
        state[key] = (m @ v if left else v @ m).to(value)


def resize_model(
    model: nn.Module,
    ranks: dict[str, int],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    adapter: str = ADAPTER,
) -> list[Resize]:
    """Resize every layer named in ``ranks``; shrinks first, so a budget holds throughout."""
    layers = dict(lora_layers(model, adapter))
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise ValueError(f"no LoRA layer named {unknown[0]!r} ({len(unknown)} unknown names)")
    config = getattr(model, "peft_config", {}).get(adapter)
    init = getattr(config, "init_lora_weights", True)
    current = {name: int(layers[name].lora_A[adapter].weight.shape[0]) for name in ranks}
    order = sorted(ranks, key=lambda n: (ranks[n] > current[n], n))
    done = [
        resize_layer(
            layers[n],
            ranks[n],
            name=n,
            adapter=adapter,
            optimizer=optimizer,
            generator=generator,
            init=init,
        )
        for n in order
        if ranks[n] != current[n]
    ]
    if done:
        sync_peft_config(model, adapter)
    return done


def sync_peft_config(model: nn.Module, adapter: str = ADAPTER) -> None:
    """Make ``model.peft_config`` describe the actual shapes: ``rank_pattern`` and
    ``alpha_pattern`` per module (full names) where they differ from ``r``/``lora_alpha``,
    and rank-0 modules in ``exclude_modules``, so plain peft loads the saved adapter."""
    config: Any = model.peft_config[adapter]  # type: ignore[index]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    excluded: list[str] = []
    for name, layer in lora_layers(model, adapter):
        rank = layer.r[adapter]
        if rank == 0:
            excluded.append(name)
            continue
        if rank != config.r:
            rank_pattern[name] = rank
        alpha = layer.lora_alpha[adapter]
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    previous = config.exclude_modules
    if isinstance(previous, str):
        if excluded:
            raise ValueError("a rank-0 module cannot be saved with a regex exclude_modules")
        return
    # Names of current LoRA layers in ``previous`` were put there by an earlier sync.
    layers = {name for name, _ in lora_layers(model, adapter)}
    kept = {name for name in previous or () if name not in layers}
    config.exclude_modules = sorted(kept | set(excluded)) or None


def save_adapter(model: Any, target: Path) -> None:
    """``save_pretrained`` into ``target`` without the zero-size tensors of rank-0 modules."""
    model.save_pretrained(target)
    excluded = getattr(model.peft_config.get(ADAPTER), "exclude_modules", None)
    weights = Path(target) / "adapter_model.safetensors"
    if excluded and weights.is_file():
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        save_file({k: v for k, v in tensors.items() if v.numel()}, weights, {"format": "pt"})
