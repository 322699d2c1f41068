"""Configuration: typed schema and YAML composition."""

from strato_peft.config.loader import ConfigError, load_config, resolved_yaml
from strato_peft.config.schema import ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "resolved_yaml"]
