"""Cost model: params equal peft's, FLOPs equal FlopCounterMode, memory is consistent.

FLOPs are checked on a real training step (forward + backward, eager
attention) of a tiny random Llama and of a SmolLM2-135M-shaped one; memory on
CPU against the tensors autograd saves (``saved_tensors_hooks``), on CUDA
against ``max_memory_allocated``.
"""

from __future__ import annotations

import json
import random
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from strato_peft import costs

TOLERANCE = 0.02  # the bound; the model is exact on these shapes (measured error 0)
QV = ["q_proj", "v_proj"]
LORA = costs.CostTerms()
DORA = costs.CostTerms(magnitude_vector=True)
ADALORA = costs.CostTerms(singular_values=True, orthogonality_regularizer=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Thousands of tiny ops under FlopCounterMode: one thread is 3-5x faster than two here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama_config(layers: int = 4, tied: bool = False, **fields: Any) -> LlamaConfig:
    shape: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    shape.update(fields)
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=tied, **shape)
    config._attn_implementation = "eager"
    return config


SMOLLM2_CONFIG: dict[str, Any] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
)


def peft_model(config: LlamaConfig, peft_config: Any, dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    return get_peft_model(model, peft_config)


def lora_for(allocation: dict[str, int], **kwargs: Any) -> LoraConfig:
    """A LoraConfig instantiating exactly ``allocation`` (module names as targets, ranks as pattern)."""
    names = [name for name, rank in allocation.items() if rank]
    return LoraConfig(
        r=8, target_modules=names, rank_pattern=dict(allocation), task_type="CAUSAL_LM", **kwargs
    )


def random_allocation(
    arch: costs.Architecture, rng: random.Random, lowest: int = 0
) -> dict[str, int]:
    """Random ranks from STRATO's menu on random slots of layers >= ``lowest`` (never empty)."""
    slots = costs.adaptable_slots(arch, layers=range(lowest, arch.num_hidden_layers))
    allocation = {s.name: rng.choice([0, 0, 1, 2, 4, 8, 16]) for s in slots}
    allocation[rng.choice(slots).name] = rng.choice([2, 4, 8])
    return allocation


def measured_step_flops(model: Any, batch: int, seq: int, vocab: int) -> int:
    model.train()
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return int(counter.get_total_flops())


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- acceptance figures


def test_llama2_acceptance_params() -> None:
    seven, thirteen = costs.LLAMA2_7B, costs.LLAMA2_13B
    qv16 = costs.uniform_allocation(seven, 16, QV)
    assert costs.trainable_params(seven, qv16, LORA) == 8_388_608
    assert costs.trainable_params(seven, qv16, DORA) == 8_650_752
    assert (
        costs.trainable_params(thirteen, costs.uniform_allocation(thirteen, 16, QV)) == 13_107_200
    )


def test_upper_half_cuts_llama2_7b_training_flops_by_a_fifth() -> None:
    arch = costs.LLAMA2_7B
    settings = costs.CostSettings(batch_size=4, seq_len=512)
    full = costs.estimate_costs(arch, costs.uniform_allocation(arch, 16, QV), settings=settings)
    upper_alloc = costs.uniform_allocation(arch, 16, QV, layers=costs.upper_layers(arch))
    upper = costs.estimate_costs(arch, upper_alloc, settings=settings)
    ratios = upper.relative_to(full)
    assert ratios["train_flops"] <= 0.8
    assert ratios["params"] == pytest.approx(0.5)
    assert ratios["forward_flops"] == pytest.approx(1.0, abs=1e-3)  # placement changes the backward
    assert ratios["memory"] < 0.8  # and the saved activations
    # shrinking ranks alone barely moves FLOPs (the base dominates)
    r4 = costs.estimate_costs(arch, costs.uniform_allocation(arch, 4, QV), settings=settings)
    assert r4.relative_to(full)["train_flops"] > 0.99


def test_architecture_from_hf_config_and_base_params() -> None:
    for tied in (False, True):
        config = llama_config(tied=tied)
        arch = costs.Architecture.from_hf_config(config)
        assert arch.base_params() == sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    smol = costs.Architecture.from_hf_config(llama_config(30, tied=True, **SMOLLM2_CONFIG))
    assert (smol.q_width, smol.kv_width, smol.base_params()) == (576, 192, 134_515_008)
    assert smol.base_params() == costs.SMOLLM2_135M.base_params()


# --------------------------------------------------------------------------- params


def test_uniform_allocation_names_match_peft_and_meta_device() -> None:
    config = llama_config()
    arch = costs.Architecture.from_hf_config(config)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=QV))
    assert costs.allocation_from_peft_model(model) == costs.uniform_allocation(arch, 8, QV)
    assert costs.trainable_params(arch, costs.uniform_allocation(arch, 8, QV)) == trainable(model)


@pytest.mark.parametrize(
    ("terms", "make"),
    [
        (LORA, lambda: LoraConfig(r=8, target_modules=QV)),
        (
            LORA,
            lambda: LoraConfig(
                r=4, target_modules=list(costs.MODULE_TYPES), layers_to_transform=[2, 3]
            ),
        ),
        (DORA, lambda: LoraConfig(r=8, target_modules=QV, use_dora=True)),
        (DORA, lambda: LoraConfig(r=2, target_modules=["o_proj", "down_proj"], use_dora=True)),
        (
            # no task_type: a bare PeftModel, which skips AdaLoRA's regulariser
            costs.CostTerms(singular_values=True, orthogonality_regularizer=False),
            lambda: AdaLoraConfig(
                init_r=6,
                target_r=2,
                target_modules=[*QV, "up_proj"],
                total_step=100,
                tinit=10,
                tfinal=20,
            ),
        ),
    ],
    ids=["lora", "lora-all-linear-top-layers", "dora", "dora-o-down", "adalora"],
)
def test_params_equal_instantiated_peft_model(
    terms: costs.CostTerms, make: Callable[[], Any]
) -> None:
    model = peft_model(llama_config(tied=True), make())
    arch = costs.Architecture.from_hf_config(model.get_base_model().config)
    report, allocation = costs.estimate_costs_for_peft_model(model)
    assert costs.cost_terms_of_peft_model(model) == terms == report.terms
    assert (
        costs.trainable_params(arch, allocation, terms)
        == trainable(model)
        == report.trainable_params
    )


def test_params_equal_peft_for_random_allocations() -> None:
    config = llama_config()
    arch = costs.Architecture.from_hf_config(config)
    rng = random.Random(5)
    for i in range(12):
        allocation = random_allocation(arch, rng, lowest=rng.randrange(arch.num_hidden_layers))
        terms = (LORA, DORA)[i % 2]
        with torch.device("meta"):
            model = get_peft_model(
                LlamaForCausalLM(config), lora_for(allocation, use_dora=terms.magnitude_vector)
            )
        assert costs.allocation_from_peft_model(model) == {k: v for k, v in allocation.items() if v}
        assert costs.trainable_params(arch, allocation, terms) == trainable(model)


def test_adalora_reports_allocated_and_effective_ranks() -> None:
    """Run AdaLoRA's real budget schedule to its final mask, then read both ranks."""
    config = llama_config(2)
    adalora = AdaLoraConfig(
        init_r=6,
        target_r=2,
        target_modules=QV,
        total_step=4,
        tinit=1,
        tfinal=1,
        deltaT=1,
        task_type="CAUSAL_LM",
    )
    model = peft_model(config, adalora)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    report, allocation = costs.estimate_costs_for_peft_model(
        model, costs.CostSettings(batch_size=1, seq_len=8)
    )
    effective = costs.adalora_effective_ranks(model)
    arch = costs.Architecture.from_hf_config(config)
    assert set(allocation.values()) == {6} and allocation.keys() == effective.keys()
    assert sum(effective.values()) == 2 * len(effective)  # AdaLoRA's budget: target_r on average
    assert (
        report.trainable_params
        == trainable(model)
        == costs.trainable_params(arch, allocation, ADALORA)
    )
    assert report.terms == ADALORA  # task_type="CAUSAL_LM": the regulariser runs
    assert report.effective_trainable_params == costs.trainable_params(arch, effective, ADALORA)
    assert report.effective_trainable_params < report.trainable_params
    assert (report.rank_total, report.effective_rank_total) == (
        6 * len(effective),
        2 * len(effective),
    )


def test_bad_allocations_fail_clearly() -> None:
    arch = costs.Architecture.from_hf_config(llama_config())
    with pytest.raises(ValueError, match="layer 9"):
        costs.trainable_params(arch, {"model.layers.9.self_attn.q_proj": 4})
    with pytest.raises(ValueError, match="not an adaptable"):
        costs.trainable_params(arch, {"model.layers.0.self_attn.rotary": 4})
    assert costs.estimate_costs(arch, {"model.layers.0.mlp.up_proj": 0}).trainable_params == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer", "lion", "unknown optimizer 'lion'; known: adamw"),
        ("attn_implementation", "xformers", "unknown attn_implementation 'xformers'"),
        ("weight_dtype", "fp12", "unknown dtype 'fp12'; known: fp32"),
        ("activation_dtype", "fp12", "unknown dtype 'fp12'"),
        ("adapter_dtype", "fp12", "unknown dtype 'fp12'"),
    ],
)
def test_bad_settings_fail_clearly(field: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        costs.CostSettings(**{field: value})


def test_cost_terms_are_priced_term_by_term() -> None:
    """Each term adds its own price, so a method combining terms needs no new code."""
    arch = costs.LLAMA2_7B
    allocation = costs.uniform_allocation(arch, 16, QV)
    base = costs.trainable_params(arch, allocation)
    magnitude = costs.trainable_params(arch, allocation, DORA) - base
    singular = costs.trainable_params(arch, allocation, ADALORA) - base
    both = costs.CostTerms(magnitude_vector=True, singular_values=True)
    assert (magnitude, singular) == (2 * 32 * 4096, 2 * 32 * 16)
    assert costs.trainable_params(arch, allocation, both) == base + magnitude + singular
    assert LORA.plain_lora and not DORA.plain_lora and not ADALORA.plain_lora
    assert costs.CostTerms(orthogonality_regularizer=True).plain_lora
    settings = costs.CostSettings(batch_size=2, seq_len=64)
    flops = {
        name: costs.training_flops(arch, allocation, terms, settings).train
        for name, terms in (
            ("lora", LORA),
            ("adalora", ADALORA),
            ("bare", replace(ADALORA, orthogonality_regularizer=False)),
        )
    }
    regulariser = 3 * 2.0 * 16 * 16 * (4096 + 4096) * len(allocation)  # forward + 2x backward
    assert flops["adalora"] - flops["bare"] == pytest.approx(regulariser)
    assert flops["bare"] == flops["lora"]  # singular values add no matmul


# --------------------------------------------------------------------------- FLOPs


def assert_flops_agree(
    model: Any, arch: costs.Architecture, batch: int, seq: int, **settings: Any
) -> float:
    report, _ = costs.estimate_costs_for_peft_model(
        model, costs.CostSettings(batch_size=batch, seq_len=seq, **settings)
    )
    measured = measured_step_flops(model, batch, seq, arch.vocab_size)
    error = report.flops.train / measured - 1
    assert abs(error) <= TOLERANCE, (report.flops, measured)
    return error


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoraConfig(r=8, target_modules=QV, task_type="CAUSAL_LM"),
        lambda: LoraConfig(r=8, target_modules=QV, use_dora=True, task_type="CAUSAL_LM"),
        lambda: LoraConfig(r=4, target_modules="all-linear", use_dora=True, lora_dropout=0.1),
        lambda: AdaLoraConfig(
            init_r=8, target_modules=[*QV, "down_proj"], total_step=100, task_type="CAUSAL_LM"
        ),
        lambda: AdaLoraConfig(
            init_r=4, target_modules=["v_proj"], total_step=100, layers_to_transform=[3]
        ),
    ],
    ids=["lora", "dora", "dora-dropout-all-linear", "adalora", "adalora-bare-peftmodel-top-layer"],
)
def test_flops_match_flop_counter_for_methods(make: Callable[[], Any]) -> None:
    model = peft_model(llama_config(), make())
    assert_flops_agree(
        model, costs.Architecture.from_hf_config(model.get_base_model().config), 2, 24
    )


def test_flops_match_flop_counter_for_random_allocations() -> None:
    config = llama_config()
    arch = costs.Architecture.from_hf_config(config)
    rng = random.Random(0)
    lowest_layers = set()
    for i in range(24):
        lowest = rng.randrange(arch.num_hidden_layers) if i % 2 else 0
        allocation = random_allocation(arch, rng, lowest)
        lowest_layers.add(costs.lowest_adapted_layer(arch, allocation))
        dora = i % 3 == 2
        model = peft_model(config, lora_for(allocation, use_dora=dora))
        assert_flops_agree(model, arch, rng.choice([1, 2]), rng.choice([8, 16, 24]))
    assert {1, 2, 3} <= lowest_layers  # lower layers left without adapters were covered


@pytest.mark.parametrize("disable_input_grads", [False, True])
def test_flops_with_gradient_checkpointing(disable_input_grads: bool) -> None:
    config = llama_config()
    arch = costs.Architecture.from_hf_config(config)
    allocation = {
        **costs.uniform_allocation(arch, 4, QV, layers=[2, 3]),
        "model.layers.3.mlp.down_proj": 2,
    }
    model = peft_model(config, lora_for(allocation))
    model.gradient_checkpointing_enable()  # HF also calls enable_input_require_grads()
    if disable_input_grads:
        model.disable_input_require_grads()  # safe with non-reentrant checkpointing
    assert_flops_agree(
        model, arch, 2, 16, gradient_checkpointing=True, input_requires_grad=not disable_input_grads
    )
    settings = costs.CostSettings(batch_size=2, seq_len=16)
    plain = costs.training_flops(arch, allocation, settings=settings)
    with_gc = costs.training_flops(
        arch, allocation, settings=replace(settings, gradient_checkpointing=True)
    )
    assert plain.recompute == 0 < with_gc.recompute < plain.forward


def test_flops_on_smollm2_shape_lora_and_upper_half() -> None:
    """Direction and size of the placement effect, measured on a SmolLM2-135M-shaped model."""
    config = llama_config(30, tied=True, **SMOLLM2_CONFIG)
    arch = costs.Architecture.from_hf_config(config)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    measured, estimated = {}, {}
    for name, layers in (("lora", None), ("upper", costs.upper_layers(arch))):
        allocation = costs.uniform_allocation(arch, 8, QV, layers=layers)
        model = get_peft_model(base, lora_for(allocation))
        estimated[name] = costs.training_flops(
            arch, allocation, settings=costs.CostSettings(batch_size=1, seq_len=32)
        ).train
        measured[name] = measured_step_flops(model, 1, 32, arch.vocab_size)
        assert estimated[name] == pytest.approx(measured[name], rel=TOLERANCE)
        base = model.unload()
    measured_ratio, estimated_ratio = (
        measured["upper"] / measured["lora"],
        estimated["upper"] / estimated["lora"],
    )
    assert measured_ratio < 0.8
    assert estimated_ratio == pytest.approx(measured_ratio, rel=TOLERANCE)


def test_flop_report_split_and_json() -> None:
    arch = costs.LLAMA2_7B
    report = costs.estimate_costs(
        arch,
        costs.uniform_allocation(arch, 8, costs.MODULE_TYPES),
        DORA,
        costs.CostSettings(batch_size=4, seq_len=512, grad_accum_steps=16),
    )
    data = json.loads(json.dumps(report.to_dict()))
    for key in (
        "trainable_params",
        "forward_flops_per_token",
        "train_flops_per_token",
        "train_flops_per_step",
        "adapter_flops_share",
        "memory_bytes",
        "memory_breakdown",
    ):
        assert key in data
    assert data["train_flops_per_step"] == pytest.approx(
        data["train_flops_per_token"] * 4 * 512 * 16
    )
    assert 0 < data["adapter_flops_share"] < 0.05
    assert sum(data["memory_breakdown"].values()) == pytest.approx(data["memory_bytes"], abs=8)
    # a rough sanity bound: training costs about 2-3x the forward
    assert 2.0 < data["train_flops_per_token"] / data["forward_flops_per_token"] < 3.0
    assert (data["batch_size"], data["seq_len"], data["grad_accum_steps"]) == (4, 512, 16)
    assert data["cost_terms"] == {
        "magnitude_vector": True,
        "singular_values": False,
        "orthogonality_regularizer": False,
    }
    assert data["settings"]["activation_dtype"] == "bf16"  # resolved from the weights'
    again = costs.estimate_costs(
        arch,
        costs.uniform_allocation(arch, 8, costs.MODULE_TYPES),
        costs.CostTerms(**data["cost_terms"]),
        costs.CostSettings(**data["settings"]),
    )
    assert again.to_dict() == report.to_dict()
    assert report.relative_to(report) == {
        "params": 1.0,
        "train_flops": 1.0,
        "forward_flops": 1.0,
        "memory": 1.0,
    }


# --------------------------------------------------------------------------- memory


def saved_activation_bytes(model: Any, batch: int, seq: int, vocab: int) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, Any]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = (storage.nbytes(), weakref.ref(tensor))
        return tensor

    model.train()
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    held = sum(
        nbytes for nbytes, ref in saved.values() if ref() is not None
    )  # graphs dropped in forward are not
    del loss
    return held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("terms", "allocation"),
    [
        (LORA, {f"model.layers.{i}.self_attn.{m}": 8 for i in range(4) for m in QV}),
        (LORA, {"model.layers.2.self_attn.v_proj": 4, "model.layers.3.mlp.up_proj": 2}),
        (LORA, {"model.layers.1.mlp.down_proj": 4, "model.layers.3.self_attn.o_proj": 8}),
        (DORA, {"model.layers.2.self_attn.k_proj": 4, "model.layers.2.mlp.gate_proj": 2}),
    ],
    ids=["lora-qv", "lora-v-up", "lora-down-o", "dora-k-gate"],
)
def test_activation_memory_equals_saved_tensors(
    terms: costs.CostTerms, allocation: dict[str, int], dtype: torch.dtype
) -> None:
    config = llama_config()
    arch = costs.Architecture.from_hf_config(config)
    model = peft_model(config, lora_for(allocation, use_dora=terms.magnitude_vector), dtype=dtype)
    batch, seq = 2, 16
    name = "fp32" if dtype == torch.float32 else "bf16"
    estimate = costs.activation_bytes(
        arch,
        allocation,
        terms,
        costs.CostSettings(batch_size=batch, seq_len=seq, activation_dtype=name),
    )
    log_softmax_and_labels = (
        batch * seq * (arch.vocab_size * 4 + 8)
    )  # saved by the loss, part of "logits"
    measured = saved_activation_bytes(model, batch, seq, arch.vocab_size) - log_softmax_and_labels
    assert estimate == pytest.approx(
        measured, rel=0.015
    )  # LoRA: exact; DoRA: -1% (per-call vectors)


def test_activation_memory_scales_with_tokens_and_adapted_depth() -> None:
    arch = costs.LLAMA2_7B

    def act(layers: Any = None, **kwargs: Any) -> float:
        allocation = costs.uniform_allocation(arch, 16, QV, layers=layers)
        shape = {"batch_size": 4, "seq_len": 512, **kwargs}
        settings = costs.CostSettings(attn_implementation="sdpa", **shape)
        return costs.activation_bytes(arch, allocation, settings=settings)

    assert act(batch_size=8) == pytest.approx(2 * act(), rel=1e-4)  # but the rotary cos/sin
    assert act(seq_len=1024) == pytest.approx(2 * act(), rel=1e-3)  # sdpa: no S x S term
    qv16 = costs.uniform_allocation(arch, 16, QV)
    eager = costs.activation_bytes(
        arch, qv16, settings=costs.CostSettings(batch_size=4, seq_len=1024)
    )
    assert eager > 2 * costs.activation_bytes(
        arch, qv16, settings=costs.CostSettings(batch_size=4, seq_len=512)
    )
    # each extra fully differentiated layer adds the same amount
    depths = [act(layers=range(lowest, 32)) for lowest in (31, 24, 16, 8)]
    steps = [depths[1] - depths[0], depths[2] - depths[1], depths[3] - depths[2]]
    assert steps[1] == pytest.approx(steps[2]) and steps[0] / 7 == pytest.approx(steps[1] / 8)
    assert act(layers=range(16, 32)) < 0.55 * act()
    assert act(gradient_checkpointing=True) < 0.2 * act()
    assert costs.activation_bytes(arch, {}) == 0


def test_memory_components() -> None:
    arch = costs.LLAMA2_7B
    allocation = costs.uniform_allocation(arch, 16, QV)
    settings = costs.CostSettings(batch_size=4, seq_len=512, weight_dtype="bf16")
    report = costs.estimate_costs(arch, allocation, settings=settings)
    memory = report.memory
    assert memory.frozen_weights == arch.base_params() * 2
    assert memory.adapter_params == memory.gradients == 8_388_608 * 4
    assert memory.optimizer_states == 8_388_608 * 4 * 2  # AdamW: two fp32 states
    assert memory.logits == 4 * 512 * 32000 * (2 + 4 + 4)
    sgd = costs.estimate_costs(arch, allocation, settings=replace(settings, optimizer="sgd"))
    assert sgd.memory.optimizer_states == 0
    nf4 = costs.estimate_costs(
        arch, allocation, settings=replace(settings, weight_dtype="nf4", activation_dtype="bf16")
    )
    assert nf4.memory.frozen_weights == memory.frozen_weights / 4
    assert report.memory_bytes == pytest.approx(sum(memory.as_dict().values()), abs=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_estimate_against_cuda_peak() -> None:
    config = llama_config(30, tied=True, **SMOLLM2_CONFIG)
    arch = costs.Architecture.from_hf_config(config)
    batch, seq = 4, 512
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(config).to("cuda", torch.bfloat16),
        LoraConfig(r=16, target_modules=QV, task_type="CAUSAL_LM"),
    )
    report, _ = costs.estimate_costs_for_peft_model(
        model, costs.CostSettings(batch_size=batch, seq_len=seq, weight_dtype="bf16")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, arch.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step holds the optimizer states from the first
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated()
    assert report.memory_bytes == pytest.approx(peak, rel=0.25)
