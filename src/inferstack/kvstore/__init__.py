"""Multi-tier KV store: 256-token chunks keyed by the shared KV hashing, across host, disk, Redis.

Exports resolve lazily (PEP 562) so that ``inferstack.kvstore.settings`` can be imported by config
loading without pulling in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChunkBuffer": "codec", "ChunkLayout": "codec", "CorruptChunk": "codec", "decode_chunk": "codec",
    "encode_chunk": "codec", "KVStoreConfig": "settings", "build_store": "config",
    "parse_tiers": "settings", "KVTierSettings": "settings", "LookupResult": "store", "StoreEvent": "store",
    "TieredKVStore": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'inferstack.kvstore' has no attribute {name!r}")
    return getattr(importlib.import_module(f"inferstack.kvstore.{module}"), name)
