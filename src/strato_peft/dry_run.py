"""``--dry-run``: what a run would train and what it would cost, without weights.

The model is built on the meta device (shapes only: seconds even for 13B, no download
when the config carries architecture fields), the configured PEFT method is applied,
and parameters are counted from the instantiated modules, so the figures are those of
the real model, not a formula's.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from strato_peft import costs
from strato_peft.config.schema import ExperimentConfig
from strato_peft.methods import get_method, run_folder
from strato_peft.models import build_meta_model, resolve_source

if TYPE_CHECKING:
    from peft import PeftModel

LAYER_RE = re.compile(r"\.layers\.(\d+)\.(?:[a-z_]+\.)?([a-z_]+)$")


def summarise_ranks(ranks: dict[str, int]) -> list[dict[str, Any]]:
    """Group per-module ranks by (module type, rank): which layers have what."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for name, rank in ranks.items():
        match = LAYER_RE.search(name)
        if match:
            groups[(match.group(2), rank)].append(int(match.group(1)))
        else:
            groups[(name, rank)].append(-1)
    return [
        {"module": module, "rank": rank, "layers": sorted(layers)}
        for (module, rank), layers in sorted(groups.items())
    ]


def _layer_span(layers: list[int]) -> str:
    if layers == [-1]:
        return "-"
    spans, start, prev = [], layers[0], layers[0]
    for layer in [*layers[1:], None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    return ",".join(spans)


def dry_run_report(config: ExperimentConfig, platform_note: str | None = None) -> dict[str, Any]:
    """Build the meta model with the configured method and count what would be trained."""
    model = build_meta_model(config.model)
    total = sum(p.numel() for p in model.parameters())
    method = get_method(config.peft)
    report: dict[str, Any] = {
        "model": config.model.name,
        "model_source": resolve_source(config.model).kind,
        "num_hidden_layers": getattr(model.config, "num_hidden_layers", None),
        "hidden_size": getattr(model.config, "hidden_size", None),
        "task": config.task.name,
        "method": config.peft.method,
        "seed": config.seed,
        "run_dir": str(run_folder(config)),
    }
    if platform_note:
        report["platform"] = platform_note
    report["warnings"] = config_warnings(config)
    if method.static_allocation:
        peft_model = method.build(model)
    else:
        # A searched allocation is only known after the search; report its reference.
        from peft import get_peft_model

        peft_model = get_peft_model(model, method.reference_config(model))
    report.update(method.dry_run_notes(config.training.max_steps))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ranks = costs.allocation_from_peft_model(peft_model)
    report["costs"] = cost_estimate(config, peft_model)
    for key in ("forward_flops_per_token", "train_flops_per_token", "train_flops_per_step"):
        report[key] = report["costs"][key]
    report["adapter_flops_share"] = report["costs"]["adapter_flops_share"]
    report["memory_bytes"] = report["costs"]["memory_bytes"]
    plan = report.get("search_plan")
    if plan:  # at most the reference's FLOPs per step: every candidate is within the budget
        plan["flops_upper_bound"] = plan["step_equivalents"] * report["train_flops_per_step"]
    report.update(
        total_params=total,
        trainable_params=trainable,
        all_params=total + trainable,
        trainable_percent=100.0 * trainable / total,
        adapted_modules=len(ranks),
        module_ranks=ranks,
        rank_summary=summarise_ranks(ranks),
    )
    return report


def config_warnings(config: ExperimentConfig) -> list[str]:
    """Settings a real run accepts but that are probably a mistake (logged when the config
    is validated; the dry run lists them)."""
    return config.peft.strato.budget.cap_warnings()


WEIGHT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def cost_estimate(config: ExperimentConfig, peft_model: PeftModel) -> dict[str, Any]:
    """The cost model's figures for one optimizer step of this config (see ``costs``)."""
    t = config.training
    weight_dtype = WEIGHT_DTYPES.get(config.model.torch_dtype, "fp32")
    mixed = config.device_info.mixed_precision and config.device_info.precision != "fp32"
    activation_dtype = (
        config.device_info.precision if config.device_info.precision in ("bf16", "fp16") else None
    )
    settings = costs.CostSettings(
        batch_size=t.batch_size,
        seq_len=config.task.max_length,
        grad_accum_steps=t.gradient_accumulation_steps,
        weight_dtype=weight_dtype,
        activation_dtype=activation_dtype if mixed else None,
        gradient_checkpointing=t.gradient_checkpointing,
    )
    # cost terms, allocation and dropout come from the built model itself
    report, _ = costs.estimate_costs_for_peft_model(peft_model, settings)
    data: dict[str, Any] = report.to_dict()
    data["assumptions"] = (
        f"batch {t.batch_size} x {config.task.max_length} tokens (task.max_length), "
        f"{t.gradient_accumulation_steps} micro-batches a step, weights {weight_dtype}, AdamW"
    )
    return data


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable dry-run report."""
    lines = [
        f"model            {report['model']} ({report['model_source']}; "
        f"{report['num_hidden_layers']} layers, hidden {report['hidden_size']})",
        f"task / method    {report['task']} / {report['method']}   seed {report['seed']}",
    ]
    if "platform" in report:
        lines.append(f"platform         {report['platform']}")
    lines += [f"warning          {message}" for message in report.get("warnings", [])]
    if "note" in report:
        lines.append(f"note             {report['note']}")
        lines.append(f"budget           {report['budget']}")
    if "search_plan" in report:
        plan = report["search_plan"]
        ratio = plan["step_equivalents_ratio"]
        shape = (
            ", ".join(
                f"{n} x {r} steps"
                for n, r in zip(plan["evaluations_per_rung"], plan["rungs"], strict=True)
            )
            if plan["mode"] == "structured"
            else f"{plan['evaluations']} x {plan['steps_per_evaluation']} steps"
        )
        lines.append(
            f"search plan      {plan['mode']}: {shape}; {plan['step_equivalents']} optimizer-step "
            f"equivalents{f' ({ratio:.2f}x the run)' if ratio else ''}, at most "
            f"{plan['flops_upper_bound'] / 1e15:.2f} PFLOP"
        )
    lines += [
        f"total params     {report['total_params']:,} (base model)",
        f"trainable params {report['trainable_params']:,} ({report['trainable_percent']:.4f}% of base)",
        f"adapted modules  {report['adapted_modules']}",
        f"train FLOPs      {report['train_flops_per_token'] / 1e9:.3f} GFLOP/token, "
        f"{report['train_flops_per_step'] / 1e12:.2f} TFLOP/optimizer step "
        f"(adapter share {100 * report['adapter_flops_share']:.2f}%; forward "
        f"{report['forward_flops_per_token'] / 1e9:.3f} GFLOP/token)",
        f"memory estimate  {_gib(report['memory_bytes'])}: "
        + ", ".join(f"{k} {_gib(v)}" for k, v in report["costs"]["memory_breakdown"].items()),
        f"                 ({report['costs']['assumptions']})",
        "ranks            "
        + "; ".join(
            f"{g['module']} r={g['rank']} layers {_layer_span(g['layers'])}"
            for g in report["rank_summary"]
        ),
        f"run folder       {report['run_dir']}",
    ]
    return "\n".join(lines)
