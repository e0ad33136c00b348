"""KV tier settings, shared by the engine flags (``--kv-tiers`` ...) and ``inferstack.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inferstack.kvstore.codec import ChunkLayout
from inferstack.kvstore.settings import parse_tiers
from inferstack.kvstore.store import TieredKVStore
from inferstack.kvstore.tiers import DiskTier, HostTier, RedisTier, Tier
from inferstack.kvstore.tiers.redis import DEFAULT_TTL_S
from inferstack.kvstore.writeback import DEFAULT_QUEUE_BYTES


@dataclass
class KVStoreConfig:
    tiers: list[str] = field(default_factory=list)    # empty: no external KV store
    host_bytes: int = 4 << 30
    disk_path: Path | None = None
    disk_bytes: int = 20 << 30
    redis_url: str | None = None
    redis_ttl_s: int = DEFAULT_TTL_S
    writeback_queue_bytes: int = DEFAULT_QUEUE_BYTES

    def __post_init__(self) -> None:
        self.tiers = parse_tiers(self.tiers)
        if "disk" in self.tiers and self.disk_path is None:
            raise ValueError("--kv-tiers includes disk but --kv-disk-path is not set")
        if "redis" in self.tiers and not self.redis_url:
            raise ValueError("--kv-tiers includes redis but --kv-redis-url is not set (e.g. redis://127.0.0.1:6379/0)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--kv-redis-url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.tiers)


def build_tiers(cfg: KVStoreConfig) -> list[Tier]:
    tiers: list[Tier] = []
    for name in cfg.tiers:
        if name == "host":
            tiers.append(HostTier(cfg.host_bytes))
        elif name == "disk":
            assert cfg.disk_path is not None
            tiers.append(DiskTier(cfg.disk_path, cfg.disk_bytes))
        else:
            assert cfg.redis_url is not None
            tiers.append(RedisTier(cfg.redis_url, ttl_s=cfg.redis_ttl_s))
    return tiers


def build_store(cfg: KVStoreConfig, layout: ChunkLayout, root: bytes) -> TieredKVStore:
    return TieredKVStore(build_tiers(cfg), layout, root, writeback_queue_bytes=cfg.writeback_queue_bytes)
