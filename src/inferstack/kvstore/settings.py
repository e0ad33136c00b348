"""KV tier settings as they appear in ``inferstack.yaml`` (torch-free: config loading stays light)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inferstack.sizes import parse_size

TIER_NAMES = ("host", "disk", "redis")
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




class KVTierSettings(BaseModel):
    """KV tiers of every engine replica `inferstack up` starts (docs/kv-cache.md). Replicas share
    the disk tier's directory and the Redis server, so each reuses the prefixes the others computed.
    Left out, `disk_path` is `LOGDIR/kv-disk` and `redis_url` a private `redis-server` that `up`
    starts on a free loopback port and stops with the stack."""

    model_config = ConfigDict(extra="forbid")

    tiers: list[str] = Field(description="Tiers fastest first: any of host, disk, redis.")
    host_bytes: str | int = Field("2GiB", description="Host RAM budget per engine, e.g. 2GiB.")
    disk_path: str | None = Field(None, description="Disk tier directory, shared by the replicas "
                                  "(default: kv-disk in the log directory).")
    disk_bytes: str | int = Field("20GiB", description="Disk tier budget.")
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

    def engine_args(self, default_disk_path: str, redis_url: str | None = None) -> list[str]:
        """The same settings as `inferstack engine serve` flags; ``redis_url`` is the server `up`
        started when none was configured."""
        args = ["--kv-tiers", ",".join(self.tiers), "--kv-host-bytes", str(self.host_bytes)]
        if "disk" in self.tiers:
            args += ["--kv-disk-path", self.disk_path or default_disk_path, "--kv-disk-bytes", str(self.disk_bytes)]
        if "redis" in self.tiers:
            url = self.redis_url or redis_url
            if url is None:
                raise ValueError("the redis tier needs redis_url, or the Redis server `up` starts")
            args += ["--kv-redis-url", url]
        return args
