"""What a KV tier is: a byte store keyed by 32-byte chunk keys. Validation lives in the store."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from inferstack.kvstore.stats import TierStats

Value = bytes | bytearray


class Tier(ABC):
    name: str      # "host", "disk", "redis": the label on metrics and in --kv-tiers
    medium: str    # KV events medium: "host", "disk" or "remote"

    def __init__(self) -> None:
        self.stats = TierStats()
        # Set by the store: told which keys a tier dropped on its own (LRU), for KV events.
        self.on_evict: Callable[[list[bytes]], None] | None = None
        self.retry_after_s = 5.0
        self._down_until = 0.0

    def available(self) -> bool:
        """False for ``retry_after_s`` after a failure, so a dead tier (Redis down) costs one
        timeout per interval instead of one per request."""
        return time.monotonic() >= self._down_until

    def failed(self) -> None:
        self.stats.add(errors=1)
        self._down_until = time.monotonic() + self.retry_after_s

    def _evicted(self, keys: list[bytes]) -> None:
        self.stats.add(evictions=len(keys))
        if self.on_evict is not None:
            self.on_evict(keys)

    @abstractmethod
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys are present, in one pass (one round trip for a remote tier)."""

    @abstractmethod
    def get(self, key: bytes) -> Value | None: ...

    def get_many(self, keys: Sequence[bytes]) -> list[Value | None]:
        """Several values at once; remote tiers override this to use one round trip."""
        return [self.get(k) for k in keys]

    @abstractmethod
    def put(self, key: bytes, value: Value) -> bool:
        """Store a value; False when it cannot fit (bigger than the whole budget)."""

    @abstractmethod
    def delete(self, key: bytes) -> None: ...

    def used_bytes(self) -> int | None:
        return None

    def capacity_bytes(self) -> int | None:
        return None

    def close(self) -> None:
        return None
