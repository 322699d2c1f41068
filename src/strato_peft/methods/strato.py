"""STRATO: a PPO controller allocates per-module LoRA ranks under a cost budget.

The search lands with its own issue; until then the method validates its settings and
the dry run reports the reference LoRA configuration its budget is relative to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato_peft.methods.base import Method, MethodError

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel


class StratoMethod(Method):
    """Placeholder that knows its reference; training raises a clear error."""

    name = "strato"
    static_allocation = False

    def reference_config(self) -> LoraConfig:
        """The uniform LoRA that STRATO's budget (``peft.strato.budget``) is relative to."""
        from peft import LoraConfig

        ref = self.settings.strato.reference
        kwargs = self.lora_kwargs()
        kwargs.update(
            r=ref.rank, target_modules=list(ref.target_modules), rank_pattern={}, alpha_pattern={}
        )
        return LoraConfig(**kwargs)

    def peft_config(self, model: PreTrainedModel) -> LoraConfig:
        raise MethodError(
            "peft.method=strato: the allocation search is not implemented yet (issue #6); "
            "use --dry-run to see the reference LoRA and the budget, or peft.method=lora"
        )
