"""Where inferstack keeps derived files on this machine (a leaf module: no inferstack imports)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The one cache folder: ``$INFERSTACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/inferstack``, else
    ``~/.cache/inferstack``. Holds converted GGUF weights (``gguf/``), tokenizer caches
    (``tokenizers/``), CPU calibrations and the model store (``models/``, unless
    ``$INFERSTACK_MODEL_STORE`` names another)."""
    explicit = os.environ.get("INFERSTACK_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inferstack"
