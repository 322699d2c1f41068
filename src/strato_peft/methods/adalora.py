"""AdaLoRA (Zhang et al., 2023) through ``peft.AdaLoraConfig``.

Adapters are parameterised as ``P diag(E) Q`` starting at ``init_rank`` per module; the
budget falls on a cubic schedule from ``tinit`` to ``total_step - tfinal`` down to an
average of ``peft.rank`` (the target rank), masking the least important triplets.
peft requires ``update_and_allocate(step)`` after every optimizer step: that is done in
:meth:`AdaLoraMethod.on_optimizer_step`, the loop's generic per-step hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from strato_peft.costs import CostTerms
from strato_peft.methods.base import Method, MethodError, StepContext

if TYPE_CHECKING:
    from peft import AdaLoraConfig, PeftModel
    from transformers import PreTrainedModel

#: Used when no training plan is known (``--dry-run``): parameter counts do not depend on it.
DRY_RUN_TOTAL_STEPS = 1000


class AdaLoraMethod(Method):
    """SVD-style adaptive rank allocation with masking."""

    name = "adalora"
    cost_terms = CostTerms(singular_values=True, orthogonality_regularizer=True)

    @property
    def init_rank(self) -> int:
        s = self.settings
        return s.adalora.init_rank or s.rank + (s.rank + 1) // 2

    def peft_config(self, model: PreTrainedModel) -> AdaLoraConfig:
        from peft import AdaLoraConfig

        s = self.settings
        a = s.adalora
        if self.init_rank < s.rank:
            raise MethodError(
                f"peft.adalora.init_rank ({self.init_rank}) must be >= peft.rank ({s.rank}), the "
                "target rank AdaLoRA prunes down to"
            )
        total = self.total_steps or DRY_RUN_TOTAL_STEPS
        if a.tinit >= total - a.tfinal:
            raise MethodError(
                f"peft.adalora: tinit ({a.tinit}) + tfinal ({a.tfinal}) leave no budgeting phase in "
                f"{total} optimizer steps; lower them or train longer"
            )
        kwargs = self.lora_builder.shared_kwargs()
        kwargs.pop("use_rslora")  # AdaLoRA scales by its own ranknum
        return AdaLoraConfig(
            init_r=self.init_rank,
            target_r=s.rank,
            tinit=a.tinit,
            tfinal=a.tfinal,
            deltaT=a.delta_t,
            beta1=a.beta1,
            beta2=a.beta2,
            orth_reg_weight=a.orth_reg_weight,
            total_step=total,
            target_modules=list(s.target_modules),
            layers_to_transform=list(s.layers_to_transform) if s.layers_to_transform else None,
            rank_pattern=dict(s.rank_pattern),
            alpha_pattern=dict(s.alpha_pattern),
            **kwargs,
        )

    def build(self, model: PreTrainedModel) -> PeftModel:
        peft_model = super().build(model)
        # peft creates the ``ranknum`` buffer-like parameter with requires_grad=False, but
        # on the meta device (dry run) it comes out trainable; make both agree.
        for name, param in peft_model.named_parameters():
            if ".ranknum." in name:
                param.requires_grad_(False)
        return peft_model

    def regularization(self, model: PeftModel) -> Any:
        """Orthogonality penalty ``w * mean ||P^T P - I||_F`` over AdaLoRA's P and Q.

        peft adds it inside ``forward`` only when the model computes its own loss from
        ``labels``; our loop computes the answer-token loss itself, so it adds the same
        term here (the formula of ``peft.tuners.adalora.AdaLoraModel.forward``).
        """
        import torch

        weight = self.settings.adalora.orth_reg_weight
        if weight == 0:
            return None
        terms = []
        for name, param in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and param.requires_grad:
                cov = param @ param.T if "lora_A" in name else param.T @ param
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.norm(cov - eye, ord="fro"))
        return weight * torch.stack(terms).mean() if terms else None

    def on_optimizer_step(
        self, model: PeftModel, step: int, context: StepContext | None = None
    ) -> None:
        # peft's contract: after optimizer.step(), before zero_grad(); the gradients are
        # still there and feed the sensitivity estimate.
        model.base_model.update_and_allocate(step)  # type: ignore[operator]
