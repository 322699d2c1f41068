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

from strato_peft.config.schema import ExperimentConfig
from strato_peft.methods import get_method
from strato_peft.models import build_meta_model, resolve_source
from strato_peft.results import run_dir

if TYPE_CHECKING:
    from peft import PeftModel

LAYER_RE = re.compile(r"\.layers\.(\d+)\.(?:[a-z_]+\.)?([a-z_]+)$")


def module_ranks(model: PeftModel) -> dict[str, int]:
    """Adapted module name (as in the base model) -> rank of its adapter."""
    ranks: dict[str, int] = {}
    for name, module in model.named_modules():
        r = getattr(module, "r", None)
        if isinstance(r, dict) and r:
            base_name = name.removeprefix("base_model.model.")
            ranks[base_name] = int(next(iter(r.values())))
    return ranks


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
        "run_dir": str(run_dir(config)),
    }
    if platform_note:
        report["platform"] = platform_note
    if method.static_allocation:
        peft_model = method.build(model)
    else:
        # A searched allocation is only known after the search; report its reference.
        from peft import get_peft_model

        ref = method.reference_config()  # type: ignore[attr-defined]
        peft_model = get_peft_model(model, ref)
        budget = config.peft.strato.budget
        report["note"] = (
            "strato: the allocation is found by the search at run time; the figures below "
            "are those of the reference LoRA its budget is relative to"
        )
        report["budget"] = {"params": budget.params, "flops": budget.flops}
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ranks = module_ranks(peft_model)
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


def format_report(report: dict[str, Any]) -> str:
    """The human-readable dry-run report."""
    lines = [
        f"model            {report['model']} ({report['model_source']}; "
        f"{report['num_hidden_layers']} layers, hidden {report['hidden_size']})",
        f"task / method    {report['task']} / {report['method']}   seed {report['seed']}",
    ]
    if "platform" in report:
        lines.append(f"platform         {report['platform']}")
    if "note" in report:
        lines.append(f"note             {report['note']}")
        lines.append(f"budget           {report['budget']}")
    lines += [
        f"total params     {report['total_params']:,} (base model)",
        f"trainable params {report['trainable_params']:,} ({report['trainable_percent']:.4f}% of base)",
        f"adapted modules  {report['adapted_modules']}",
        "ranks            "
        + "; ".join(
            f"{g['module']} r={g['rank']} layers {_layer_span(g['layers'])}"
            for g in report["rank_summary"]
        ),
        f"run folder       {report['run_dir']}",
    ]
    return "\n".join(lines)
