"""Registries of PEFT methods and tasks: one plain dict each, name -> ``module:attribute``.

Entries are import paths so that validating a config never imports torch; adding a
method or a task is one module plus one line here (and one row in the contract tests).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

METHODS: dict[str, str] = {
    "lora": "strato_peft.methods.lora:LoraMethod",
    "dora": "strato_peft.methods.lora:DoraMethod",
    "adalora": "strato_peft.methods.adalora:AdaLoraMethod",
    "strato": "strato_peft.methods.strato:StratoMethod",
    "upper_lora": "strato_peft.methods.upper_lora:UpperLoraMethod",
}

TASKS: dict[str, str] = {
    "mmlu": "strato_peft.tasks.mmlu:MMLUTask",
    "gsm8k": "strato_peft.tasks.gsm8k:GSM8KTask",
    "humaneval": "strato_peft.tasks.humaneval:HumanEvalTask",
    "alpaca": "strato_peft.tasks.alpaca:AlpacaTask",
}


def did_you_mean(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    """``; did you mean 'x'?`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_name(kind: str, name: str, registry: dict[str, str]) -> str:
    """Return ``name`` if registered, else raise ``ValueError`` listing the known names."""
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise ValueError(
            f"unknown {kind} '{name}' (known: {known}){did_you_mean(name, tuple(registry))}"
        )
    return name


def resolve(kind: str, name: str, registry: dict[str, str]) -> Any:
    """Import and return the object registered under ``name``."""
    target = registry[check_name(kind, name, registry)]
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
