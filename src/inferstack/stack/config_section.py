"""Read the `up` section of inferstack.yaml (the one schema in `inferstack.config`)."""

from __future__ import annotations

from pathlib import Path

from inferstack.config import ConfigError, load_config
from inferstack.stack.settings import UpSettings


def load_up_settings(path: Path) -> UpSettings:
    """Raises ValueError('FILE:LINE: up.field: message', one line per problem) on a bad file."""
    try:
        return load_config(path).up
    except ConfigError as e:
        raise ValueError(str(e)) from None
