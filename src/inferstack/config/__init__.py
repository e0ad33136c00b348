"""`inferstack.yaml`: one schema for every capability, loaded with file:line errors."""

from inferstack.config.loader import ConfigError, load_config, parse_config
from inferstack.config.schema import InferstackConfig

__all__ = ["ConfigError", "InferstackConfig", "load_config", "parse_config"]
