"""The method contract: every registered method on the tiny model, through one matrix.

Each row builds the method, trains one optimizer step with the shared recipe, saves the
adapter the way a run does, reloads it in plain ``peft`` (same logits), and checks the
cost model against the instantiated model with the terms the method declares. Adding
a method is one module, one registry line and one row here (``docs/methods.md``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strato_peft import costs
from strato_peft.config import load_config
from strato_peft.dry_run import dry_run_report
from strato_peft.methods import get_method, method_class, run_folder
from strato_peft.methods.base import StepContext
from strato_peft.methods.resize import save_adapter
from strato_peft.models import build_tiny_model
from strato_peft.recipe import LocalAccelerator, StepRunner, TrainingRecipe
from strato_peft.registry import METHODS
from tests.conftest import CONFIGS

#: method -> (config of the tiny model, overrides). STRATO's row draws a random
#: allocation under its budget (the search itself has its own tests).
CONTRACT: dict[str, tuple[str, list[str]]] = {
    "lora": ("tiny_lora", []),
    "dora": ("tiny_dora", []),
    "adalora": ("tiny_adalora", []),
    "strato": ("tiny_strato", ["peft.strato.control=random"]),
    "upper_lora": ("tiny_lora", ["peft.method=upper_lora", "peft.rank=4"]),
}


def test_every_registered_method_has_a_contract_row() -> None:
    assert set(CONTRACT) == set(METHODS)


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_method_contract(name: str, tmp_path: Path) -> None:
    from peft import PeftModel

    experiment, overrides = CONTRACT[name]
    config = load_config(CONFIGS / "experiments" / f"{experiment}.yaml", overrides)
    cls = method_class(name)
    method = get_method(config.peft, total_steps=4)
    arch = config.model.architecture
    assert arch is not None

    # build: the trainable params are the adapter's, and the cost model, priced with the
    # terms the method declares, counts exactly them
    model = method.build(build_tiny_model(arch, seed=config.seed))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    allocation = costs.allocation_from_peft_model(model)
    hf_arch = costs.Architecture.from_hf_config(model.get_base_model().config)
    assert trainable > 0 and allocation
    assert costs.trainable_params(hf_arch, allocation, cls.cost_terms) == trainable
    report, _ = costs.estimate_costs_for_peft_model(model)
    assert report.trainable_params == trainable

    # one step with the shared recipe and the method's hooks changes the adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    recipe = TrainingRecipe.from_config(config)
    optimizer = recipe.optimizer([p for p in model.parameters() if p.requires_grad])
    runner = StepRunner(
        model, optimizer, recipe.scheduler(optimizer, 4), recipe, LocalAccelerator("cpu"),
        regularization=method.regularization,
    )  # fmt: skip
    model.train()
    loss, tokens = runner.step(
        [_batch(arch.vocab_size)],
        on_step=lambda: method.on_optimizer_step(model, 1, StepContext(optimizer=optimizer)),
    )
    assert torch.isfinite(torch.tensor(loss)) and tokens == 2 * 7  # labels 5..11 of each row
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not p.equal(before[n])]
    assert moved

    # save as a run does; plain peft reloads the same adapter (same logits)
    save_adapter(model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        build_tiny_model(arch, seed=config.seed), str(tmp_path / "adapter")
    )
    batch = _batch(arch.vocab_size, seed=1)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"]).logits
        theirs = reloaded(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # naming: the run folder carries the method's own label; the dry run prices a config
    label = cls.run_label(config.peft)
    assert run_folder(config).name == f"{label}_seed{config.seed}"
    assert label.split("_rank")[0].replace("-", "_").startswith(name.split("_")[0])
    assert dry_run_report(config)["trainable_params"] > 0
