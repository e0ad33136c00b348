"""KV tier settings (torch-free: config loading and the CLI stay light).

`KVStoreConfig` is the one settings object the store is built from (`kvstore.config.build_store`);
the engine carries it as `EngineConfig.kv_store` (from `--kv-tiers ...` flags), and `inferstack up`'s
`up.kv` section (`KVTierSettings`) turns into one, then into those flags for each replica. The
defaults below are the only ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inferstack.sizes import parse_size

TIER_NAMES = ("host", "disk", "redis")
DEFAULT_HOST_BYTES = 4 << 30             # per engine: RAM beside a 1 GiB paged cache on CPU machines
DEFAULT_DISK_BYTES = 20 << 30
DEFAULT_REDIS_TTL_S = 3600               # Redis evicts a chunk an hour after its last write
DEFAULT_WRITEBACK_QUEUE_BYTES = 256 << 20
def parse_tiers(text: str | list[str]) -> list[str]:
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    for name in names:
        if name not in TIER_NAMES:
            raise ValueError(f"unknown KV tier {name!r}; choose from {', '.join(TIER_NAMES)} "
                             "(e.g. --kv-tiers host,disk)")
    if len(set(names)) != len(names):
        raise ValueError(f"KV tier listed twice: {','.join(names)}")
    order = {n: i for i, n in enumerate(TIER_NAMES)}
    if names != sorted(names, key=order.__getitem__):
        raise ValueError(f"list KV tiers fastest first (host, disk, redis), got {','.join(names)}")
    return names




@dataclass
class KVStoreConfig:
    """What the KV store is made of: tiers fastest first, with each tier's budget or address."""

    tiers: list[str] = field(default_factory=list)    # empty: no external KV store
    host_bytes: int = DEFAULT_HOST_BYTES
    disk_path: Path | None = None
    disk_bytes: int = DEFAULT_DISK_BYTES
    redis_url: str | None = None
    redis_ttl_s: int = DEFAULT_REDIS_TTL_S
    writeback_queue_bytes: int = DEFAULT_WRITEBACK_QUEUE_BYTES

    def __post_init__(self) -> None:
        self.tiers = parse_tiers(self.tiers)
        self.host_bytes, self.disk_bytes = parse_size(self.host_bytes), parse_size(self.disk_bytes)
        if self.disk_path is not None:
            self.disk_path = Path(self.disk_path).expanduser()
        if "disk" in self.tiers and self.disk_path is None:
            raise ValueError("--kv-tiers includes disk but --kv-disk-path is not set")
        if "redis" in self.tiers and not self.redis_url:
            raise ValueError("--kv-tiers includes redis but --kv-redis-url is not set (e.g. redis://127.0.0.1:6379/0)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--kv-redis-url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.tiers)

    def engine_args(self) -> list[str]:
        """The same settings as `inferstack engine serve` flags (how `up` hands them to each replica)."""
        if not self.tiers:
            return []
        args = ["--kv-tiers", ",".join(self.tiers), "--kv-host-bytes", str(self.host_bytes)]
        if "disk" in self.tiers:
            args += ["--kv-disk-path", str(self.disk_path), "--kv-disk-bytes", str(self.disk_bytes)]
        if "redis" in self.tiers:
            args += ["--kv-redis-url", str(self.redis_url)]
        return args


class KVTierSettings(BaseModel):
    """KV tiers of every engine replica `inferstack up` starts (docs/kv-cache.md). Replicas share
    the disk tier's directory and the Redis server, so each reuses the prefixes the others computed.
    Left out, `disk_path` is `LOGDIR/kv-disk` and `redis_url` a private `redis-server` that `up`
    starts on a free loopback port and stops with the stack."""

    model_config = ConfigDict(extra="forbid")

    tiers: list[str] = Field(description="Tiers fastest first: any of host, disk, redis.")
    host_bytes: str | int = Field(DEFAULT_HOST_BYTES, description="Host RAM budget per engine, e.g. 4GiB.")
    disk_path: str | None = Field(None, description="Disk tier directory, shared by the replicas "
                                  "(default: kv-disk in the log directory).")
    disk_bytes: str | int = Field(DEFAULT_DISK_BYTES, description="Disk tier budget, e.g. 20GiB.")
    redis_url: str | None = Field(None, description="Redis tier, e.g. redis://127.0.0.1:6379/0 (default: a "
                                  "redis-server that `up` starts for the stack).")

    @field_validator("tiers", mode="before")
    @classmethod
    def _tiers(cls, v: object) -> list[str]:
        if not isinstance(v, str | list):
            raise ValueError("tiers must be a list such as [host, disk] or a string 'host,disk'")
        return parse_tiers(v)

    @field_validator("host_bytes", "disk_bytes")
    @classmethod
    def _bytes(cls, v: str | int) -> str | int:
        parse_size(v)
        return v

    @field_validator("disk_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return str(Path(v).expanduser()) if v else v

    @property
    def needs_redis_server(self) -> bool:
        """The stack must start its own Redis: the redis tier is on and no server was named."""
        return "redis" in self.tiers and not self.redis_url

    def store_config(self, default_disk_path: str, redis_url: str | None = None) -> KVStoreConfig:
        """The replicas' store settings; ``redis_url`` is the server `up` started when none was configured."""
        if "redis" in self.tiers and not (self.redis_url or redis_url):
            raise ValueError("the redis tier needs redis_url, or the Redis server `up` starts")
        return KVStoreConfig(tiers=self.tiers, host_bytes=parse_size(self.host_bytes),
                             disk_path=Path(self.disk_path or default_disk_path) if "disk" in self.tiers else None,
                             disk_bytes=parse_size(self.disk_bytes), redis_url=self.redis_url or redis_url)
