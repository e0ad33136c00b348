"""Builds the tiered KV store from its settings (`KVStoreConfig`, kvstore/settings.py)."""

from __future__ import annotations

from collections.abc import Callable

from inferstack.kvstore.codec import ChunkLayout
from inferstack.kvstore.settings import KVStoreConfig
from inferstack.kvstore.store import TieredKVStore
from inferstack.kvstore.tiers import DiskTier, HostTier, RedisTier, Tier


def _host(cfg: KVStoreConfig) -> Tier:
    return HostTier(cfg.host_bytes)


def _disk(cfg: KVStoreConfig) -> Tier:
    assert cfg.disk_path is not None  # KVStoreConfig refuses the disk tier without a path
    return DiskTier(cfg.disk_path, cfg.disk_bytes)


def _redis(cfg: KVStoreConfig) -> Tier:
    assert cfg.redis_url is not None  # KVStoreConfig refuses the redis tier without a URL
    return RedisTier(cfg.redis_url, ttl_s=cfg.redis_ttl_s)


_BUILDERS: dict[str, Callable[[KVStoreConfig], Tier]] = {"host": _host, "disk": _disk, "redis": _redis}


def build_tiers(cfg: KVStoreConfig) -> list[Tier]:
    return [_BUILDERS[name](cfg) for name in cfg.tiers]   # names were checked against TIER_NAMES


def build_store(cfg: KVStoreConfig, layout: ChunkLayout, root: bytes) -> TieredKVStore:
    return TieredKVStore(build_tiers(cfg), layout, root, writeback_queue_bytes=cfg.writeback_queue_bytes)


__all__ = ["KVStoreConfig", "build_store", "build_tiers"]
