"""Host RAM tier: a byte-bounded LRU of encoded chunks."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from inferstack.kvstore.tiers.base import Tier, Value


class HostTier(Tier):
    name = "host"
    medium = "host"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise ValueError(f"host tier capacity must be positive, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._used = 0
        self._entries: OrderedDict[bytes, Value] = OrderedDict()
        self._lock = threading.Lock()

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._entries for k in keys]

    def get(self, key: bytes) -> Value | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: Value) -> bool:
        size = len(value)
        if size > self._capacity:
            return False
        evicted: list[bytes] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= len(old)
            while self._used + size > self._capacity:
                victim_key, victim = self._entries.popitem(last=False)
                self._used -= len(victim)
                evicted.append(victim_key)
            self._entries[key] = value
            self._used += size
        if evicted:
            self._evicted(evicted)
        return True

    def delete(self, key: bytes) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= len(old)

    def used_bytes(self) -> int:
        return self._used

    def capacity_bytes(self) -> int:
        return self._capacity
