"""Base models: loading from every source, meta-device builds, tiny test models."""

from strato_peft.models.loading import (
    ModelLoadError,
    build_meta_model,
    build_tiny_model,
    load_hf_config,
    load_model,
    load_tokenizer,
    resolve_source,
)

__all__ = [
    "ModelLoadError",
    "build_meta_model",
    "build_tiny_model",
    "load_hf_config",
    "load_model",
    "load_tokenizer",
    "resolve_source",
]
