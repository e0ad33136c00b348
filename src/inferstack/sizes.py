"""Byte sizes as people write them (`4GiB`, `512MB`, `1e9`): the one parser every CLI flag and config
key uses (a leaf module: no inferstack imports, so config loading and the CLI stay light)."""

from __future__ import annotations

import re

# Binary units (KiB, Ki) are powers of two; decimal ones (KB, K) powers of ten, as in `numfmt`.
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20,
          "gi": 1 << 30, "gib": 1 << 30, "ti": 1 << 40, "tib": 1 << 40}
_SIZE = re.compile(r"\s*((?:\d+(?:\.\d+)?|\.\d+)(?:e\d+)?)\s*([a-z]*)\s*", re.I)


def parse_size(text: str | int) -> int:
    """``"1GiB"`` -> 1073741824; also ``512MiB``, ``2G`` (decimal), ``1e9``, plain byte counts and ints.
    Raises ValueError (naming the text) for anything else, and for sizes that are not positive."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.fullmatch(text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a byte size: {text!r} (use e.g. 512MiB, 4GiB, 2GB or a number of bytes)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"byte size must be positive, got {text!r}")
    return value
