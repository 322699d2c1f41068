"""The contract every PEFT method follows.

A method turns the ``peft`` config section into a ``peft`` model (:meth:`Method.build`)
and may act during training through :meth:`Method.on_optimizer_step`, a hook the
training loop calls after *every* optimizer step for *every* method, so that the loop
never branches on a method's name (AdaLoRA's ``update_and_allocate`` lives there).
With ``peft.rank_schedule.enabled``, any LoRA-family method (``lora``, ``dora``,
``strato``) resizes its ranks during training through the same hook
(:mod:`strato_peft.methods.rank_schedule`).

Everything the rest of the product needs to know about a method, it asks the method:

* :attr:`Method.cost_terms`: what the cost model prices beyond plain LoRA;
* :meth:`Method.run_label`: the run folder's name (before ``_seed<s>``) and
  :meth:`Method.tag_lambda`: the lambda of the spec's tracker tag;
* :meth:`Method.reference_config`: the ``peft`` config a dry run prices;
* :attr:`Method.static_allocation`: whether the config alone fixes the allocation.

Adding a method is one module, one line in :data:`strato_peft.registry.METHODS` and one
row in ``tests/test_method_contract.py`` (``docs/methods.md`` has a worked example).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from strato_peft.adapters import LoraBuilder
from strato_peft.config.schema import ExperimentConfig, PeftSettings
from strato_peft.costs import CostTerms
from strato_peft.registry import METHODS, did_you_mean, resolve
from strato_peft.results import run_dir

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel


class MethodError(Exception):
    """A PEFT setting does not fit the model (unknown module, layer out of range ...)."""


@dataclass
class StepContext:
    """What the loop hands to :meth:`Method.on_optimizer_step` besides the model.

    ``optimizer`` is the torch optimizer (not accelerate's wrapper): a method that
    resizes parameters resizes their state there, and sets ``resized`` so the loop
    rebuilds what is bound to parameter shapes (DDP's gradient buckets).
    """

    optimizer: Any = None
    resized: bool = False


@dataclass
class RunContext:
    """What a run knows before the adapter is built (for methods that search first)."""

    config: Any
    task: Any
    tokenizer: Any
    folder: Path
    accelerator: Any
    fast_dev_run: bool = False


class Method:
    """Base class; subclasses implement :meth:`peft_config`."""

    name = "base"
    #: False for methods whose allocation is decided at run time (``strato``).
    static_allocation = True
    #: What the cost model prices beyond plain LoRA's ``A`` and ``B`` (DoRA's magnitude...).
    cost_terms: ClassVar[CostTerms] = CostTerms()
    #: DoRA's weight decomposition on the LoRA family's adapters.
    use_dora = False

    @classmethod
    def run_label(cls, settings: PeftSettings) -> str:
        """The run folder's name before ``_seed<s>``: ``<method>_rank<r>`` by default."""
        return f"{settings.method}_rank{settings.rank}"

    @classmethod
    def tag_lambda(cls, settings: PeftSettings) -> float:
        """The ``lambdaX`` of the spec's tag ``model/task/phase/lambdaX_rankY_seedZ``."""
        return 0.0

    def __init__(self, settings: PeftSettings, total_steps: int | None = None) -> None:
        self.settings = settings
        self.total_steps = total_steps
        self.context: RunContext | None = None
        self.rank_scheduler: Any = None
        self._pending_rank_state: dict[str, Any] | None = None

    def setup_run(self, context: RunContext) -> None:
        """Called by a training run before :meth:`build` (STRATO searches in ``build``)."""
        self.context = context

    def summary(self) -> dict[str, Any]:
        """Method-specific results for ``metrics.json`` (key ``method``)."""
        if self.rank_scheduler is not None:
            return {"rank_schedule": self.rank_scheduler.summary()}
        return {}

    # -- to implement -------------------------------------------------------------------
    def peft_config(self, model: PreTrainedModel) -> PeftConfig:
        raise NotImplementedError

    def reference_config(self, model: PreTrainedModel) -> PeftConfig:
        """The ``peft`` config a dry run prices: the method's own when its allocation is
        static, the reference its budget is relative to otherwise (STRATO)."""
        return self.peft_config(model)

    def initial_state_path(self) -> Path | None:
        """A stored training state the run should start from when it has no checkpoint
        (STRATO: its search winner's, which continues into the final training)."""
        return None

    def dry_run_notes(self, total_steps: int | None) -> dict[str, Any]:
        """What a dry run should say beyond the priced config (STRATO: its search plan)."""
        return {}

    # -- the LoRA family's settings --------------------------------------------------------
    @property
    def lora_builder(self) -> LoraBuilder:
        """The run's LoRA settings; the adapters' initialisation is seeded by the run's seed."""
        seed = self.context.config.seed if self.context is not None else None
        return LoraBuilder.from_settings(self.settings, use_dora=self.use_dora, seed=seed)

    # -- shared behaviour ---------------------------------------------------------------
    def build(self, model: PreTrainedModel) -> PeftModel:
        """Validate the settings against ``model`` and wrap it with the adapter."""
        self.validate(model)
        config = self.peft_config(model)
        try:
            peft_model = self.lora_builder.build(model, config)
        except ValueError as exc:
            raise MethodError(f"peft.method={self.name}: {exc}") from None
        self.attach_rank_schedule(peft_model)
        return peft_model

    def attach_rank_schedule(self, model: PeftModel) -> None:
        """Start the rank schedule on a built model when ``peft.rank_schedule.enabled``.

        :meth:`build` calls it; for a method that builds its model otherwise, the first
        :meth:`on_optimizer_step` does (the model is still at its initial ranks then).
        """
        settings = self.settings.rank_schedule
        if not settings.enabled or self.total_steps is None:
            return
        from strato_peft.methods.rank_schedule import RankScheduler

        seed = self.context.config.seed if self.context is not None else 0
        try:
            self.rank_scheduler = RankScheduler(settings, model, self.total_steps, seed=seed)
        except ValueError as exc:
            raise MethodError(f"peft.method={self.name}: {exc}") from None
        if self._pending_rank_state is not None:
            self.rank_scheduler.load_state_dict(self._pending_rank_state)
        self._write_rank_history()

    def on_optimizer_step(
        self, model: PeftModel, step: int, context: StepContext | None = None
    ) -> None:
        """Called by the training loop after every optimizer step (``step`` counts from 1),
        before the gradients are zeroed. The base runs the rank schedule, if any."""
        self.run_rank_schedule(model, step, context)

    def run_rank_schedule(self, model: PeftModel, step: int, context: StepContext | None) -> None:
        if self.rank_scheduler is None:
            if not self.settings.rank_schedule.enabled:
                return
            self.attach_rank_schedule(model)
            if self.rank_scheduler is None:
                return
        optimizer = context.optimizer if context is not None else None
        if self.rank_scheduler.on_optimizer_step(model, step, optimizer):
            if context is not None:
                context.resized = True
            self._write_rank_history()

    def _write_rank_history(self) -> None:
        ctx = self.context
        if self.rank_scheduler is None or ctx is None:
            return
        if ctx.accelerator is None or ctx.accelerator.is_main_process:
            ctx.folder.mkdir(parents=True, exist_ok=True)
            self.rank_scheduler.write_history(ctx.folder)

    def regularization(self, model: PeftModel) -> Any:
        """An extra loss term added once per optimizer step (``None``: nothing to add)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Method state to checkpoint (the rank schedule's, if any)."""
        if self.rank_scheduler is not None:
            return {"rank_schedule": self.rank_scheduler.state_dict()}
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if "rank_schedule" in state:
            self._pending_rank_state = state["rank_schedule"]
            if self.rank_scheduler is not None:
                self.rank_scheduler.load_state_dict(state["rank_schedule"])
                self._write_rank_history()

    def validate(self, model: PreTrainedModel) -> None:
        """Target modules, layers and ``rank_pattern`` keys must all match the model.

        Plain peft ignores a ``rank_pattern`` key that matches nothing; here it is an
        error naming the key, since a typo there silently changes the experiment.
        """
        s = self.settings
        linear_names = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        for target in s.target_modules:
            if not any(n == target or n.endswith(f".{target}") for n in linear_names):
                raise MethodError(
                    f"peft.target_modules: '{target}' matches no linear module of the model "
                    f"(module types: {', '.join(suffixes)}){did_you_mean(target, suffixes)}"
                )
        n_layers = getattr(model.config, "num_hidden_layers", None)
        if s.layers_to_transform and n_layers is not None:
            bad = [i for i in s.layers_to_transform if i >= n_layers]
            if bad:
                raise MethodError(
                    f"peft.layers_to_transform: layers {bad} do not exist (the model has "
                    f"{n_layers} layers: 0..{n_layers - 1})"
                )
        targeted = self.targeted_modules(model)
        for field, pattern in (
            ("rank_pattern", s.rank_pattern),
            ("alpha_pattern", s.alpha_pattern),
        ):
            for key in pattern:
                try:
                    regex = re.compile(rf"(.*\.)?({key})$")
                except re.error as exc:
                    raise MethodError(
                        f"peft.{field}: key '{key}' is not a valid regex ({exc})"
                    ) from None
                if not any(regex.match(name) for name in targeted):
                    example = targeted[0] if targeted else "model.layers.0.self_attn.q_proj"
                    raise MethodError(
                        f"peft.{field}: key '{key}' matches no adapted module (keys match the end "
                        f"of a module name such as '{example}')"
                    )

    def targeted_modules(self, model: PreTrainedModel) -> list[str]:
        """Names of the modules the adapter will wrap (target modules x layers)."""
        s = self.settings
        layer_re = re.compile(r"\.layers\.(\d+)\.")
        names = []
        for name, module in model.named_modules():
            if type(module).__name__ != "Linear":
                continue
            if not any(name == t or name.endswith(f".{t}") for t in s.target_modules):
                continue
            if s.layers_to_transform is not None:
                match = layer_re.search(f".{name}")
                if match is None or int(match.group(1)) not in s.layers_to_transform:
                    continue
            names.append(name)
        return names

    def configured_lora(self) -> PeftConfig:
        """The ``LoraConfig`` of the ``peft`` section as written (targets, layers, patterns)."""
        s = self.settings
        return self.lora_builder.config(
            r=s.rank,
            target_modules=s.target_modules,
            layers_to_transform=s.layers_to_transform,
            rank_pattern=s.rank_pattern,
            alpha_pattern=s.alpha_pattern,
        )


def method_class(name: str) -> type[Method]:
    """The registered method class named ``name`` (an unknown name lists the known ones)."""
    cls: type[Method] = resolve("method", name, METHODS)
    return cls


def get_method(settings: PeftSettings, total_steps: int | None = None) -> Method:
    """Instantiate the registered method named by ``settings.method``."""
    return method_class(settings.method)(settings, total_steps=total_steps)


def run_folder(config: ExperimentConfig, fast_dev_run: bool = False) -> Path:
    """The run folder of ``config``, named by its method (:meth:`Method.run_label`)."""
    label = method_class(config.peft.method).run_label(config.peft)
    return run_dir(config, label, fast_dev_run=fast_dev_run)
