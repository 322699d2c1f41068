"""STRATO: a PPO controller allocates per-module LoRA ranks under a cost budget.

``build`` runs the search (:mod:`strato_peft.strato`) on the base model before the
final training, then returns a plain ``peft`` LoRA whose ``target_modules`` are the
adapted modules and whose ``rank_pattern`` holds their ranks, so the saved adapter
loads without this package. Two searches: ``per_slot`` (the first version: a rank per
layer and module) and ``structured`` (v2: the lowest adapted layer and a rank per module
type, successive halving over resumable evaluations, the winner's state continued into
the final training). The search picks its result on the task's search-validation split
(``task.search_examples``, held out of the training data); the report split is never
read by it. The controls (``peft.strato.control``, :mod:`strato_peft.strato.controls`)
skip the search: ``uniform``, ``band`` and ``random``, matched on ``control_from``'s
found allocation, and ``replay``, that allocation itself trained from scratch;
``random-search`` runs the structured search with random proposals.

A finished search is not repeated: a run that resumes (or a second run in the same
folder) reads ``allocation.json``; an interrupted search resumes from its archive.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strato_peft.config.schema import PeftSettings
from strato_peft.costs import trainable_params
from strato_peft.methods.base import Method, MethodError
from strato_peft.results import ALLOCATION_FILE, SEARCH_FILE, atomic_write_json, read_json_or

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

    from strato_peft.adapters import LoraBuilder
    from strato_peft.recipe import TrainingRecipe
    from strato_peft.strato.space import SearchSpace

log = logging.getLogger(__name__)


class StratoMethod(Method):
    """Search, then train the found allocation as a LoRA with ``rank_pattern``."""

    name = "strato"
    static_allocation = False

    def __init__(self, settings: Any, total_steps: int | None = None) -> None:
        super().__init__(settings, total_steps)
        self.allocation: dict[str, int] | None = None
        self._summary: dict[str, Any] = {}
        self._winner_state: Path | None = None

    @classmethod
    def run_label(cls, settings: PeftSettings) -> str:
        """``strato_rank<r>_lambda<l>``; the controls: ``strato-uniform_rank<r>`` ..."""
        s = settings.strato
        if s.control != "none":
            return f"{settings.method}-{s.control}_rank{settings.rank}"
        return f"{settings.method}_rank{settings.rank}_lambda{s.lambda_:g}"

    @classmethod
    def tag_lambda(cls, settings: PeftSettings) -> float:
        return float(settings.strato.lambda_)

    def reference_config(self, model: PreTrainedModel | None = None) -> LoraConfig:
        """The uniform LoRA that STRATO's budget (``peft.strato.budget``) is relative to."""
        ref = self.settings.strato.reference
        return self.lora_builder.config(r=ref.rank, target_modules=ref.target_modules)

    def dry_run_notes(self, total_steps: int | None) -> dict[str, Any]:
        budget = self.settings.strato.budget
        return {
            "note": "strato: the allocation is found by the search at run time; the figures "
            "below are those of the reference LoRA its budget is relative to",
            "budget": {"params": budget.params, "flops": budget.flops},
            "search_plan": self.search_plan(total_steps),
        }

    def search_plan(self, total_steps: int | None) -> dict[str, Any]:
        """Evaluations per rung and the search's cost in optimizer-step equivalents (the
        reference anchor's included), before it runs; ``total_steps`` caps the rungs."""
        s = self.settings.strato.search
        if s.mode != "structured" and self.settings.strato.control != "random-search":
            steps = s.evaluations * s.steps_per_evaluation
            plan: dict[str, Any] = {"mode": "per_slot", "evaluations": s.evaluations,
                                    "steps_per_evaluation": s.steps_per_evaluation}  # fmt: skip
        else:
            rungs = sorted({min(r, total_steps or r) for r in s.rungs})
            alive = sum(s.proposals)
            per_rung, steps = [alive], rungs[0] * (alive + 1)
            for previous, current in itertools.pairwise(rungs):
                if alive <= 1:
                    break
                alive = math.ceil(alive / 2)
                per_rung.append(alive)
                steps += alive * (current - previous)
            plan = {"mode": "structured", "rungs": rungs[: len(per_rung)],
                    "evaluations_per_rung": per_rung, "winner_steps_reused": rungs[len(per_rung) - 1]}  # fmt: skip
        plan["step_equivalents"] = steps
        plan["step_equivalents_ratio"] = steps / total_steps if total_steps else None
        return plan

    # -- allocation ----------------------------------------------------------------------
    def space(self, model: PreTrainedModel) -> SearchSpace:
        from strato_peft.costs import Architecture
        from strato_peft.strato.space import build_space

        s = self.settings.strato
        ctx = self.context
        batch = ctx.config.training.batch_size if ctx else 1
        seq_len = ctx.config.task.max_length if ctx else 512
        try:
            return build_space(
                Architecture.from_hf_config(model.config), s,
                reference_rank=s.reference.rank, reference_modules=s.reference.target_modules,
                batch_size=batch, seq_len=seq_len, lora_dropout=self.settings.dropout,
            )  # fmt: skip
        except ValueError as exc:
            raise MethodError(f"peft.method=strato: {exc}") from None

    def choose_allocation(
        self, model: PreTrainedModel, space: SearchSpace | None = None
    ) -> dict[str, int]:
        """Run (or resume, or reuse) the search, or draw a control allocation."""
        from strato_peft.strato import controls

        s = self.settings.strato
        space = space or self.space(model)
        ctx = self.context
        seed = ctx.config.seed if ctx else 0
        if s.control == "replay":
            allocation = self._replayed(space)
            self._summary["control"] = {"kind": "replay", "from": s.control_from}
            return allocation
        if s.control in ("uniform", "band", "random"):
            found = self._control_target()
            if s.control == "uniform":
                if found is not None:
                    target = trainable_params(space.arch, found)
                    origin = f"allocation of {s.control_from}"
                else:
                    cap = s.budget.params or 1.0
                    target = int(cap * space.reference_report.trainable_params)
                    origin = f"params budget {cap:g} x reference"
                modules = s.reference.target_modules
                allocation, summary = controls.uniform(space, modules, target, origin)
            elif s.control == "band":
                if found is None:
                    raise MethodError(
                        "peft.strato.control=band needs control_from (a STRATO run folder)"
                    )
                allocation, summary = controls.band(space, found, s.module_types)
            else:
                allocation, summary = controls.random_matched(self.structured(space), found, seed)
            self._summary["control"] = summary
            return allocation
        if ctx is None:
            raise MethodError(
                "peft.method=strato searches inside a training run (strato-peft run); "
                "a bare build() has no task data to evaluate allocations on"
            )
        folder = ctx.folder
        done = read_json_or(folder / SEARCH_FILE, {})
        found_allocation = read_json_or(folder / ALLOCATION_FILE, {})
        if done.get("complete") and isinstance(found_allocation, dict) and found_allocation:
            log.info("search already complete in %s: reusing %s", folder, ALLOCATION_FILE)
            self._summary["search"] = _search_summary(done)
            winner = done.get("winner") or {}
            if winner.get("hash") and winner.get("steps"):
                from strato_peft.results import SEARCH_STATES_DIR

                name = f"{winner['hash']}@{winner['steps']}.pt"
                self._winner_state = folder / SEARCH_STATES_DIR / name
            return {str(k): int(v) for k, v in found_allocation.items()}
        accelerator = ctx.accelerator
        if accelerator.is_main_process:
            outcome = self._search(model, space)
            self._summary["search"] = _search_summary(outcome.summary)
            self._winner_state = outcome.winner_state
        accelerator.wait_for_everyone()
        allocation = read_json_or(folder / ALLOCATION_FILE, {})
        if not allocation:
            raise MethodError(f"the STRATO search wrote no allocation to {folder}")
        if not accelerator.is_main_process:
            self._summary["search"] = _search_summary(read_json_or(folder / SEARCH_FILE, {}))
        return {str(k): int(v) for k, v in allocation.items()}

    def structured(self, space: SearchSpace) -> Any:
        from strato_peft.strato.structured import StructuredSpace

        return StructuredSpace(space, list(self.settings.strato.search.depth_fractions))

    def _control_target(self) -> dict[str, int] | None:
        s = self.settings.strato
        if not s.control_from:
            return None
        found = read_json_or(Path(s.control_from) / ALLOCATION_FILE, {})
        if not found:
            raise MethodError(
                f"peft.strato.control_from: no {ALLOCATION_FILE} in {s.control_from} "
                "(give the folder of a finished STRATO run)"
            )
        return {str(k): int(v) for k, v in found.items()}

    def _replayed(self, space: SearchSpace) -> dict[str, int]:
        """``control_from``'s allocation (a run folder's allocation.json or a JSON file),
        checked against this model's slots."""
        s = self.settings.strato
        if not s.control_from:
            raise MethodError(
                "peft.strato.control=replay needs control_from (a STRATO run folder or an "
                "allocation JSON file)"
            )
        source = Path(s.control_from)
        path = source if source.is_file() else source / ALLOCATION_FILE
        found = read_json_or(path, {})
        if not isinstance(found, dict) or not found:
            raise MethodError(
                f"peft.strato.control_from: no allocation in {path} (a JSON object of module "
                "name -> rank, as a STRATO run's allocation.json)"
            )
        names = {slot.name for slot in space.slots}
        unknown = sorted(set(found) - names)
        if unknown:
            raise MethodError(
                f"peft.strato.control_from: {path} names modules this model has not, "
                f"e.g. {unknown[:3]}"
            )
        bad = {k: v for k, v in found.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise MethodError(
                f"peft.strato.control_from: {path}: ranks must be integers >= 0, got {bad}"
            )
        return {str(k): int(v) for k, v in found.items() if v}

    def _search(self, model: PreTrainedModel, space: SearchSpace) -> Any:
        from strato_peft.encoding import encode_examples
        from strato_peft.recipe import LocalAccelerator, TrainingRecipe
        from strato_peft.strato.evaluator import RealEvaluator
        from strato_peft.strato.halving import StructuredSearch
        from strato_peft.strato.search import Search
        from strato_peft.tasks.base import split_hash

        ctx = self.context
        assert ctx is not None
        cfg, task, s = ctx.config, ctx.task, self.settings.strato
        search_split = task.search_examples()
        if not search_split:
            raise MethodError(
                "peft.method=strato picks its allocation on a search-validation split held out "
                "of the training data: set task.search_examples (e.g. 64); the report split "
                "(the held-out eval examples) is never searched on"
            )
        train_split = task.train_examples()
        splits = {
            "train": split_hash(train_split),
            "search": split_hash(search_split),
            "report": split_hash(task.eval_examples()),
        }
        n = cfg.task.max_length
        train = encode_examples(task, train_split, ctx.tokenizer, n)
        held = encode_examples(task, search_split[: s.search.eval_examples], ctx.tokenizer, n)
        recipe, builder = TrainingRecipe.from_config(cfg), self.lora_builder
        structured = s.search.mode == "structured" or s.control == "random-search"
        evaluator = RealEvaluator(
            model, train, held, steps=s.search.steps_per_evaluation, recipe=recipe,
            builder=builder, accelerator=LocalAccelerator.like(ctx.accelerator),
            pad_token_id=ctx.tokenizer.pad_token_id,
            schedule_steps=self.total_steps if structured else None,
        )  # fmt: skip
        protocol = protocol_fingerprint(
            cfg, recipe, builder, len(train), len(held), self.total_steps if structured else None
        )
        if structured:
            proposer = "random" if s.control == "random-search" else "ppo"
            return StructuredSearch(
                self.structured(space), evaluator, s, ctx.folder, seed=cfg.seed,
                protocol=protocol, proposer=proposer, splits=splits,
                training_steps=self.total_steps,
            ).run()  # fmt: skip
        search = Search(
            space, evaluator, s, ctx.folder, seed=cfg.seed, protocol=protocol, splits=splits
        )
        return search.run()

    # -- Method API ------------------------------------------------------------------------
    def build(self, model: PreTrainedModel) -> PeftModel:
        self.validate_strato(model)
        space = self.space(model)
        allocation = self.choose_allocation(model, space)
        self.allocation = allocation
        from strato_peft.strato.controls import cost_fractions

        fractions = cost_fractions(space, allocation)
        self._summary["allocation"] = {
            "adapted_modules": len(allocation),
            "rank_total": sum(allocation.values()),
            "cost_fractions": fractions,
        }
        log.info(
            "STRATO allocation: %d modules, params %.3fx and training FLOPs %.3fx of the reference",
            len(allocation), fractions["params"], fractions["flops"],
        )  # fmt: skip
        if self.context is not None and self.context.accelerator.is_main_process:
            atomic_write_json(self.context.folder / ALLOCATION_FILE, allocation)
        return self.lora_builder.build(model, self.allocation_config(allocation))

    def initial_state_path(self) -> Path | None:
        """The search winner's state after its last rung: the final training continues it
        (one process only: under DDP the data is sharded unlike the search's)."""
        ctx = self.context
        if self._winner_state is None or ctx is None or ctx.accelerator.num_processes > 1:
            return None
        if not self._winner_state.is_file():
            log.warning(
                "the search winner's state %s is missing: training afresh", self._winner_state
            )
            return None
        self._summary["continued_from_search"] = str(self._winner_state.name)
        return self._winner_state

    def allocation_config(self, allocation: dict[str, int]) -> LoraConfig:
        """A plain peft LoRA for ``allocation``: exact module names, ranks in rank_pattern."""
        try:
            return self.lora_builder.for_allocation(allocation)
        except ValueError:
            raise MethodError("the STRATO allocation adapts no module") from None

    def peft_config(self, model: PreTrainedModel) -> LoraConfig:
        if self.allocation is None:
            raise MethodError("peft.method=strato: build() chooses the allocation first")
        return self.allocation_config(self.allocation)

    def validate_strato(self, model: PreTrainedModel) -> None:
        linear = {
            n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"
        }
        s = self.settings.strato
        for field, modules in (
            ("module_types", s.module_types),
            ("reference.target_modules", s.reference.target_modules),
        ):
            missing = [m for m in modules if m not in linear]
            if missing:
                raise MethodError(
                    f"peft.strato.{field}: {missing} match no linear module of the model "
                    f"(module types: {', '.join(sorted(linear))})"
                )

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), **self._summary}


def _search_summary(summary: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "real_evaluations", "search_wall_time_s", "evaluation_wall_time_s", "stop_reason",
        "policy", "base_loss", "reference_loss", "best", "lambda", "mode", "proposer",
        "winner", "cost", "splits", "evaluations_per_rung", "proxy_spearman",
    )  # fmt: skip
    return {k: summary.get(k) for k in keys}


def protocol_fingerprint(
    config: Any,
    recipe: TrainingRecipe,
    builder: LoraBuilder,
    n_train: int,
    n_held: int,
    schedule_steps: int | None = None,
) -> str:
    """Fingerprint of what a real evaluation measures (the archive's key prefix).

    Built from the same recipe and LoRA settings objects the evaluations train with, so
    any setting that changes training (``peft.bias``, the schedule ...) changes it.
    """
    fields = {
        "model": config.model.model_dump(mode="json"),
        "task": config.task.model_dump(mode="json"),
        "n_train": n_train,
        "n_held_out": n_held,
        "steps": config.peft.strato.search.steps_per_evaluation,
        "recipe": recipe.fingerprint(),
        "lora": builder.fingerprint(),
        # structured: rungs are prefixes of a run of ``schedule_steps`` (its LR schedule)
        "structured": [config.peft.strato.search.rungs, schedule_steps] if schedule_steps else None,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
