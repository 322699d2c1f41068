"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024) through ``peft.LoraConfig``.

LoRA adds ``W x + (alpha / r) B A x`` with ``A in R^{r x d_in}``, ``B in R^{d_out x r}``
(``alpha / sqrt(r)`` with rsLoRA); DoRA additionally learns a magnitude vector
``m in R^{d_out}`` and uses ``m * (W + s B A) / ||W + s B A||_col``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from strato_peft.costs import CostTerms
from strato_peft.methods.base import Method

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel


class LoraMethod(Method):
    """Uniform-rank LoRA on the target modules (per-module ranks via ``rank_pattern``)."""

    name = "lora"

    def peft_config(self, model: PreTrainedModel) -> PeftConfig:
        return self.configured_lora()


class DoraMethod(LoraMethod):
    """DoRA: weight-decomposed LoRA (``LoraConfig(use_dora=True)``)."""

    name = "dora"
    use_dora = True
    cost_terms = CostTerms(magnitude_vector=True)
