"""KV tier settings, shared by the engine flags (``--kv-tiers`` ...) and ``inferstack.yaml``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from inferstack.kvstore.codec import ChunkLayout
from inferstack.kvstore.store import TieredKVStore
from inferstack.kvstore.tiers import DiskTier, HostTier, RedisTier, Tier
from inferstack.kvstore.tiers.redis import DEFAULT_TTL_S
from inferstack.kvstore.writeback import DEFAULT_QUEUE_BYTES

TIER_NAMES = ("host", "disk", "redis")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """``"4GiB"``, ``"512MB"``, ``"1e9"`` or an int → bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a byte size: {text!r} (use e.g. 512MiB, 4GiB, 2GB or a number of bytes)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"byte size must be positive, got {text!r}")
    return value


def parse_tiers(text: str | list[str]) -> list[str]:
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    for name in names:
        if name not in TIER_NAMES:
            raise ValueError(f"unknown KV tier {name!r}; choose from {', '.join(TIER_NAMES)} (e.g. --kv-tiers host,disk)")
    if len(set(names)) != len(names):
        raise ValueError(f"KV tier listed twice: {','.join(names)}")
    order = {n: i for i, n in enumerate(TIER_NAMES)}
    if names != sorted(names, key=order.__getitem__):
        raise ValueError(f"list KV tiers fastest first (host, disk, redis), got {','.join(names)}")
    return names


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
