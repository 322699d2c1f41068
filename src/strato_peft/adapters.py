"""LoRA adapters from settings: the one place that turns ``peft`` settings into a ``LoraConfig``.

Every LoRA-family adapter the product trains is configured here: the baselines' uniform
LoRA and DoRA (target modules, layers, ``rank_pattern``), STRATO's final training and
every STRATO search evaluation (an *allocation*: exact module name -> rank). The settings
they share (alpha, dropout, rsLoRA, bias, DoRA, the seed of the adapters'
initialisation) are read once from the ``peft`` config section into a frozen
:class:`LoraBuilder`, so a search evaluation measures exactly the model that the final
training trains, and :meth:`LoraBuilder.fingerprint` changes whenever a setting does.

LoRA (Hu et al., 2021, arXiv:2106.09685) adds ``(alpha / r) B A x`` to a frozen linear
layer (``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023). With mixed ranks the alpha
policy (``peft.alpha_policy``) is stated, and the same in every arm of a comparison:
``fixed`` keeps ``alpha`` for every module (scaling ``alpha / r``: under Adam early
learning is close to rank-invariant), ``proportional`` keeps the reference's ``alpha / r``
(a larger scale for lower ranks), ``rslora`` scales by ``alpha / sqrt(r)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import LoraConfig, PeftConfig, PeftModel
    from torch import nn

    from strato_peft.config.schema import PeftSettings

TASK_TYPE = "CAUSAL_LM"


@dataclass(frozen=True)
class LoraBuilder:
    """The LoRA settings every adapter of a run shares (see the module docstring)."""

    alpha: float
    dropout: float
    use_rslora: bool
    bias: str
    use_dora: bool = False
    init_seed: int | None = None
    """Seed of the adapters' initialisation (``None``: the current torch RNG state)."""
    alpha_policy: str = "fixed"
    """Alpha of an allocation's modules: ``fixed`` (``alpha``), ``proportional``
    (``alpha x r / reference_rank``) or ``rslora`` (``alpha / sqrt(r)`` scaling)."""
    reference_rank: int = 16

    @classmethod
    def from_settings(
        cls, settings: PeftSettings, *, use_dora: bool = False, seed: int | None = None
    ) -> LoraBuilder:
        return cls(
            alpha=float(settings.alpha),
            dropout=float(settings.dropout),
            use_rslora=bool(settings.use_rslora),
            bias=str(settings.bias),
            use_dora=use_dora,
            init_seed=seed,
            alpha_policy=str(settings.alpha_policy),
            reference_rank=int(settings.strato.reference.rank),
        )

    def fingerprint(self) -> dict[str, Any]:
        """Every setting, as JSON-able values: part of a search's protocol fingerprint."""
        return asdict(self)

    def shared_kwargs(self) -> dict[str, Any]:
        """The ``LoraConfig`` keywords every adapter of the run has in common."""
        return {
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "task_type": TASK_TYPE,
        }

    def config(
        self,
        *,
        r: int,
        target_modules: Sequence[str],
        layers_to_transform: Sequence[int] | None = None,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
    ) -> LoraConfig:
        """A ``LoraConfig`` on ``target_modules`` (suffixes or exact names), with the alpha
        policy applied to every rank in it (an explicit ``alpha_pattern`` wins)."""
        from peft import LoraConfig

        ranks = dict(rank_pattern or {})
        alphas = dict(alpha_pattern or {})
        alpha = self.alpha
        if self.alpha_policy == "proportional":
            scale = self.alpha / self.reference_rank
            alpha = scale * r
            alphas = {**{k: scale * v for k, v in ranks.items()}, **alphas}
        config = LoraConfig(
            r=r,
            target_modules=list(target_modules),
            layers_to_transform=list(layers_to_transform) if layers_to_transform else None,
            rank_pattern=ranks,
            alpha_pattern=alphas,
            use_dora=self.use_dora,
            **self.shared_kwargs(),
        )
        config.lora_alpha = alpha  # type: ignore[assignment]  # peft takes floats
        if self.alpha_policy == "rslora":
            config.use_rslora = True
        return config

    def for_allocation(self, allocation: Mapping[str, int]) -> LoraConfig:
        """A plain ``LoraConfig`` for ``allocation``: exact module names, the most common
        rank as ``r`` and the others in ``rank_pattern`` (it loads without this package)."""
        chosen = {name: int(rank) for name, rank in allocation.items() if rank}
        if not chosen:
            raise ValueError("the allocation adapts no module")
        ranks = [chosen[n] for n in sorted(chosen)]
        default = max(sorted(set(ranks)), key=ranks.count)
        return self.config(
            r=default,
            target_modules=sorted(chosen),
            rank_pattern={n: r for n, r in chosen.items() if r != default},
        )

    def build(self, base: nn.Module, config: PeftConfig) -> PeftModel:
        """Wrap ``base`` with ``config``; the initialisation is seeded by :attr:`init_seed`."""
        import torch
        from peft import get_peft_model

        if self.init_seed is not None:
            torch.manual_seed(self.init_seed)
        return get_peft_model(base, config)
