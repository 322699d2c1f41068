"""Model loading from every source; hub paths fail offline with the offline options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strato_peft.config.schema import ArchitectureConfig, ModelConfig
from strato_peft.models import (
    ModelLoadError,
    build_meta_model,
    build_tiny_model,
    load_hf_config,
    load_model,
    resolve_source,
)

TINY = ArchitectureConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def test_tiny_model_is_deterministic_per_seed() -> None:
    a, b, c = (
        build_tiny_model(TINY, seed=1),
        build_tiny_model(TINY, seed=1),
        build_tiny_model(TINY, seed=2),
    )
    x = torch.randint(0, 128, (1, 8))
    assert torch.equal(a(x).logits, b(x).logits)
    assert not torch.equal(a(x).logits, c(x).logits)
    expected = 128 * 32 * 2 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    # embed + lm_head (untied) + per layer (q,o: 32x32; k,v: 32x16; mlp 3x32x64; 2 norms) + final norm
    assert sum(p.numel() for p in a.parameters()) == expected


def test_load_model_tiny_source() -> None:
    model = load_model(ModelConfig(name="t", source="tiny", architecture=TINY), seed=3)
    assert model.config.num_hidden_layers == 2
    assert torch.equal(
        model.model.embed_tokens.weight, build_tiny_model(TINY, seed=3).model.embed_tokens.weight
    )


@pytest.mark.parametrize(
    ("path", "kind"),
    [("meta-llama/Llama-2-7b-hf", "hub"), ("org/model.v2", "hub")],
)
def test_auto_source_infers_hub(path: str, kind: str) -> None:
    assert resolve_source(ModelConfig(name="m", path=path)).kind == kind


def test_auto_source_local_gguf_and_architecture(tmp_path: Path) -> None:
    model = build_tiny_model(TINY)
    model.save_pretrained(tmp_path / "saved")
    assert resolve_source(ModelConfig(name="m", path=str(tmp_path / "saved"))).kind == "local"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    src = resolve_source(ModelConfig(name="m", path=str(gguf)))
    assert (src.kind, src.location, src.gguf_file) == ("gguf", str(tmp_path), "m.gguf")
    assert resolve_source(ModelConfig(name="m", architecture=TINY)).kind == "architecture"


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [
        (ModelConfig(name="m"), "neither 'path' nor 'architecture'"),
        (ModelConfig(name="m", path="not a/valid id/x"), "neither an existing folder"),
        (ModelConfig(name="m", source="gguf", path="/nope/x.gguf"), "GGUF file not found"),
        (ModelConfig(name="m", source="local", path="/nope"), "no config.json"),
        (ModelConfig(name="m", source="tiny"), "needs model.architecture"),
        (ModelConfig(name="m", source="hub"), "needs model.path"),
    ],
)
def test_bad_model_settings_are_clear(cfg: ModelConfig, fragment: str) -> None:
    with pytest.raises(ModelLoadError, match=fragment):
        load_model(cfg)


def test_local_folder_round_trip(tmp_path: Path) -> None:
    model = build_tiny_model(TINY, seed=5)
    model.save_pretrained(tmp_path / "saved")
    again = load_model(ModelConfig(name="m", path=str(tmp_path / "saved")))
    x = torch.randint(0, 128, (2, 6))
    torch.testing.assert_close(again(x).logits, model(x).logits)


def test_hub_offline_names_the_offline_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="m", path="someone/definitely-not-cached-model")
    for call in (load_model, load_hf_config):
        with pytest.raises(ModelLoadError) as err:
            call(cfg)
        msg = str(err.value)
        assert "HF_HUB_OFFLINE is set" in msg
        for option in (
            "model.path=/a/local/folder",
            "model.source=packaged",
            "model.source=tiny",
            "--dry-run",
        ):
            assert option in msg


def test_architecture_only_model_works_on_meta_not_for_training() -> None:
    cfg = ModelConfig(name="m", path="meta-llama/Llama-2-7b-hf", architecture=TINY)
    meta = build_meta_model(cfg)
    assert next(meta.parameters()).device.type == "meta"
    with pytest.raises(ModelLoadError, match="architecture fields only"):
        load_model(ModelConfig(name="m", architecture=TINY))


def test_device_map_places_a_loaded_model_and_is_refused_where_it_cannot_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    build_tiny_model(TINY, seed=5).save_pretrained(tmp_path / "saved")
    seen: dict[str, object] = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    placed = load_model(ModelConfig(name="m", path=str(tmp_path / "saved"), device_map="auto"))
    assert seen["device_map"] == "auto"  # accelerate's big-model placement did the loading
    assert {p.device.type for p in placed.parameters()} == {"cpu"}  # no GPU here
    with pytest.raises(ModelLoadError, match=r"device_map.*tiny model is built in memory"):
        load_model(ModelConfig(name="t", source="tiny", architecture=TINY, device_map="auto"))


def test_device_map_with_a_multi_process_launch_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from strato_peft.config import load_config
    from strato_peft.platform import PlatformError
    from strato_peft.training import run
    from tests.conftest import CONFIGS

    class TwoProcesses:
        num_processes = 2
        is_main_process = True

        def __init__(self, **kwargs: object) -> None:
            pass

    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", TwoProcesses)
    config = load_config(
        CONFIGS / "experiments" / "tiny_lora.yaml",
        ["model.device_map=auto", f"output.dir={tmp_path}"],
    )
    with pytest.raises(PlatformError, match=r"device_map='auto'.*2 processes"):
        run.setup(config, run.RunOptions(), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_compile_model_is_refused_where_torch_compile_is_not_supported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from strato_peft import platform as platform_module
    from strato_peft.config import load_config
    from strato_peft.platform import Platform, PlatformError
    from strato_peft.training import run
    from tests.conftest import CONFIGS

    mps = Platform(name="mps", device="mps", device_name="Apple M2", precision="fp32", reason="t")
    monkeypatch.setattr(platform_module, "select_platform", lambda cfg: mps)
    config = load_config(
        CONFIGS / "experiments" / "tiny_lora.yaml", ["device_info.compile_model=true"]
    )
    with pytest.raises(PlatformError, match=r"compile_model.*not supported on mps"):
        run.setup(config, run.RunOptions(), tmp_path / "run")
