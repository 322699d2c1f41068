#!/usr/bin/env python
"""Print the cost table of docs/costs.md: ``python scripts/cost_table.py [--batch-size 4] [--seq-len 512]``.

Trainable params, training FLOPs per token and training memory for Llama-2-7B
and -13B under LoRA, DoRA and an upper-half-only allocation, computed by
``strato_peft.costs`` from the architectures' shapes (no weights, no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

try:
    import strato_peft  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from strato_peft import costs

QV = ("q_proj", "v_proj")
LORA = costs.CostTerms()
DORA = costs.CostTerms(magnitude_vector=True)


def rows(arch: costs.Architecture) -> list[tuple[str, costs.CostTerms, dict[str, int]]]:
    """(label, cost terms, allocation) for the table's configurations."""
    upper = costs.upper_layers(arch)
    first, last = upper[0], upper[-1]
    return [
        ("LoRA r16 q,v", LORA, costs.uniform_allocation(arch, 16, QV)),
        ("LoRA r8 all 7 linear", LORA, costs.uniform_allocation(arch, 8, costs.MODULE_TYPES)),
        ("DoRA r16 q,v", DORA, costs.uniform_allocation(arch, 16, QV)),
        (
            f"LoRA r16 q,v, layers {first}-{last} only",
            LORA,
            costs.uniform_allocation(arch, 16, QV, upper),
        ),
        (
            f"LoRA r32 q,v, layers {first}-{last} only",
            LORA,
            costs.uniform_allocation(arch, 32, QV, upper),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", help="frozen weights and activations")
    parser.add_argument(
        "--json", action="store_true", help="full reports as JSON instead of the table"
    )
    args = parser.parse_args(argv)
    settings = costs.CostSettings(
        batch_size=args.batch_size, seq_len=args.seq_len, weight_dtype=args.dtype
    )
    checkpointed = dataclasses.replace(settings, gradient_checkpointing=True)

    reports = []
    lines = [
        "| model | adapters | trainable params | train GFLOPs/token | vs LoRA r16 q,v | memory GiB | "
        "activations GiB | memory GiB, grad. ckpt |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arch in (costs.LLAMA2_7B, costs.LLAMA2_13B):
        reference = None
        for label, terms, allocation in rows(arch):
            report = costs.estimate_costs(arch, allocation, terms, settings)
            ckpt = costs.estimate_costs(arch, allocation, terms, checkpointed)
            reference = reference or report
            reports.append({"label": label, **report.to_dict()})
            lines.append(
                f"| {arch.name} | {label} | {report.trainable_params:,} | "
                f"{report.train_flops_per_token / 1e9:.2f} | "
                f"{report.relative_to(reference)['train_flops']:.3f} | "
                f"{report.memory_bytes / 2**30:.1f} | {report.memory.activations / 2**30:.1f} | "
                f"{ckpt.memory_bytes / 2**30:.1f} |"
            )
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
