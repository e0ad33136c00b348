"""KV tier settings as they appear in ``inferstack.yaml`` (torch-free: config loading stays light)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

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




class KVTierSettings(BaseModel):
    """KV tiers of every engine replica (docs/kv-cache.md). Replicas on one host that share
    ``disk_path`` (or a ``redis_url``) reuse each other's prefixes."""

    model_config = ConfigDict(extra="forbid")

    tiers: list[str] = Field(description="Tiers fastest first: any of host, disk, redis.")
    host_bytes: str | int = Field("2GiB", description="Host RAM budget per engine, e.g. 2GiB.")
    disk_path: str | None = Field(None, description="Disk tier directory, shared by the replicas.")
    disk_bytes: str | int = Field("20GiB", description="Disk tier budget.")
    redis_url: str | None = Field(None, description="Redis tier, e.g. redis://127.0.0.1:6379/0.")

    @field_validator("tiers", mode="before")
    @classmethod
    def _tiers(cls, v: object) -> list[str]:
        if not isinstance(v, str | list):
            raise ValueError("tiers must be a list such as [host, disk] or a string 'host,disk'")
        return parse_tiers(v)

    @field_validator("host_bytes", "disk_bytes")
    @classmethod
    def _bytes(cls, v: str | int) -> str | int:
        parse_bytes(v)
        return v

    @field_validator("disk_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return str(Path(v).expanduser()) if v else v

    def model_post_init(self, _: object) -> None:
        if "disk" in self.tiers and not self.disk_path:
            raise ValueError("tiers include disk but disk_path is not set")
        if "redis" in self.tiers and not self.redis_url:
            raise ValueError("tiers include redis but redis_url is not set")

    def engine_args(self) -> list[str]:
        """The same settings as `inferstack engine serve` flags."""
        args = ["--kv-tiers", ",".join(self.tiers), "--kv-host-bytes", str(self.host_bytes)]
        if self.disk_path:
            args += ["--kv-disk-path", self.disk_path, "--kv-disk-bytes", str(self.disk_bytes)]
        if self.redis_url:
            args += ["--kv-redis-url", self.redis_url]
        return args
