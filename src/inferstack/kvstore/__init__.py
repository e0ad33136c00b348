"""Multi-tier KV store: 256-token chunks keyed by the shared KV hashing, across host, disk, Redis."""

from inferstack.kvstore.codec import ChunkBuffer, ChunkLayout, CorruptChunk, decode_chunk, encode_chunk
from inferstack.kvstore.config import KVStoreConfig, build_store, parse_bytes, parse_tiers
from inferstack.kvstore.store import LookupResult, StoreEvent, TieredKVStore

__all__ = [
    "ChunkBuffer",
    "ChunkLayout",
    "CorruptChunk",
    "KVStoreConfig",
    "LookupResult",
    "StoreEvent",
    "TieredKVStore",
    "build_store",
    "decode_chunk",
    "encode_chunk",
    "parse_bytes",
    "parse_tiers",
]
