"""Cost model: trainable params, training FLOPs and memory of PEFT allocations (DESIGN.md section 4).

Pure functions of the architecture's shape and a per-module allocation
(module name -> rank), so they answer instantly for 7B/13B models and on the
meta device::

    from strato_peft import costs

    arch = costs.LLAMA2_7B  # or costs.Architecture.from_hf_config(model.config)
    settings = costs.CostSettings(batch_size=4, seq_len=512)
    qv = ["q_proj", "v_proj"]
    lora = costs.estimate_costs(arch, costs.uniform_allocation(arch, 16, qv), settings=settings)
    upper = costs.estimate_costs(arch, costs.uniform_allocation(
        arch, 16, qv, layers=costs.upper_layers(arch)), settings=settings)
    upper.relative_to(lora)  # {"params": 0.5, "train_flops": 0.75..., ...}
    dora = costs.estimate_costs(arch, costs.uniform_allocation(arch, 16, qv),
                                costs.CostTerms(magnitude_vector=True), settings)

What a method adds beyond LoRA's ``A`` and ``B`` is its :class:`CostTerms`
(declared by the method, ``Method.cost_terms``); the cost model prices those
terms and never asks a method's name.
"""

from strato_peft.costs.allocation import (
    Allocation,
    adalora_effective_ranks,
    allocation_from_peft_model,
    lowest_adapted_layer,
    parse_module_name,
    resolve_allocation,
    uniform_allocation,
    upper_layers,
)
from strato_peft.costs.architecture import (
    KNOWN_ARCHITECTURES,
    LLAMA2_7B,
    LLAMA2_13B,
    MODULE_TYPES,
    SMOLLM2_135M,
    Architecture,
    Slot,
    adaptable_slots,
    module_name,
)
from strato_peft.costs.flops import FlopCount, forward_flops, training_flops
from strato_peft.costs.memory import (
    MemoryEstimate,
    activation_bytes,
    logits_bytes,
    memory_estimate,
)
from strato_peft.costs.report import (
    CostReport,
    estimate_costs,
    estimate_costs_for_peft_model,
    trainable_params,
)
from strato_peft.costs.terms import (
    DEFAULT_SETTINGS,
    PLAIN_LORA,
    CostSettings,
    CostTerms,
    cost_terms_of_peft_model,
    dtype_bytes,
)

__all__ = [
    "DEFAULT_SETTINGS",
    "KNOWN_ARCHITECTURES",
    "LLAMA2_7B",
    "LLAMA2_13B",
    "MODULE_TYPES",
    "PLAIN_LORA",
    "SMOLLM2_135M",
    "Allocation",
    "Architecture",
    "CostReport",
    "CostSettings",
    "CostTerms",
    "FlopCount",
    "MemoryEstimate",
    "Slot",
    "activation_bytes",
    "adalora_effective_ranks",
    "adaptable_slots",
    "allocation_from_peft_model",
    "cost_terms_of_peft_model",
    "dtype_bytes",
    "estimate_costs",
    "estimate_costs_for_peft_model",
    "forward_flops",
    "logits_bytes",
    "lowest_adapted_layer",
    "memory_estimate",
    "module_name",
    "parse_module_name",
    "resolve_allocation",
    "trainable_params",
    "training_flops",
    "uniform_allocation",
    "upper_layers",
]
