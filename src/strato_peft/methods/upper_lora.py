"""LoRA on the upper half of the layers: the worked example of ``docs/methods.md``.

The backward pass stops at the lowest adapted layer (DESIGN.md section 4), so adapters
only in layers ``L/2 .. L-1`` halve the trainable params of the same LoRA and cut its
training FLOPs by about a quarter, at the cost of not adapting the lower layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato_peft.config.schema import PeftSettings
from strato_peft.methods.lora import LoraMethod

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel


class UpperLoraMethod(LoraMethod):
    """``peft.target_modules`` at ``peft.rank`` in the upper half of the layers only."""

    name = "upper_lora"

    @classmethod
    def run_label(cls, settings: PeftSettings) -> str:
        return f"upper-lora_rank{settings.rank}"

    def peft_config(self, model: PreTrainedModel) -> PeftConfig:
        n = model.config.num_hidden_layers
        s = self.settings
        return self.lora_builder.config(
            r=s.rank, target_modules=s.target_modules, layers_to_transform=range(n // 2, n)
        )
