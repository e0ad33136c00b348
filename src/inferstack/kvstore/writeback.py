"""Write-back worker: tier writes happen on a thread, never on the engine's step loop.

The queue is bounded in bytes. ``submit`` never blocks: when the queue is full the write is
dropped and counted (``dropped``) — a full queue means the tiers are slower than the engine
produces KV, and blocking would stall token streams to save a cache entry. Queued chunks stay
readable (``peek``) until every target tier has them, so a request right after a save still hits.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from inferstack.kvstore.settings import DEFAULT_WRITEBACK_QUEUE_BYTES
from inferstack.kvstore.tiers.base import Tier, Value


@dataclass
class WriteBackStats:
    queued_items: int = 0
    queued_bytes: int = 0
    submitted: int = 0
    dropped: int = 0          # back-pressure: writes refused because the queue was full
    dropped_bytes: int = 0
    completed: int = 0        # chunks written to all their target tiers (or already there)


class WriteBack:
    def __init__(self, max_queue_bytes: int = DEFAULT_WRITEBACK_QUEUE_BYTES,
                 on_stored: Callable[[Tier, bytes], None] | None = None) -> None:
        self.max_queue_bytes = max_queue_bytes
        self.stats = WriteBackStats()
        self._on_stored = on_stored
        self._queue: OrderedDict[bytes, tuple[Value, tuple[Tier, ...]]] = OrderedDict()
        self._inflight: dict[bytes, Value] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvstore-writeback", daemon=True)
        self._thread.start()

    def submit(self, key: bytes, value: Value, targets: Sequence[Tier]) -> bool:
        size = len(value)
        with self._cond:
            if self._closed:
                return False
            if key in self._queue or key in self._inflight:
                return True
            if self.stats.queued_bytes + size > self.max_queue_bytes:
                self.stats.dropped += 1
                self.stats.dropped_bytes += size
                return False
            self._queue[key] = (value, tuple(targets))
            self.stats.queued_items += 1
            self.stats.queued_bytes += size
            self.stats.submitted += 1
            self._cond.notify()
        return True

    def peek(self, key: bytes) -> Value | None:
        with self._cond:
            item = self._queue.get(key)
            if item is not None:
                return item[0]
            return self._inflight.get(key)

    def pending(self, keys: Sequence[bytes]) -> list[bool]:
        with self._cond:
            return [k in self._queue or k in self._inflight for k in keys]

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything submitted so far is written; True if it drained in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                key, (value, targets) = self._queue.popitem(last=False)
                self._inflight[key] = value
            for tier in targets:
                self._write(tier, key, value)
            with self._cond:
                del self._inflight[key]
                self.stats.queued_items -= 1
                self.stats.queued_bytes -= len(value)
                self.stats.completed += 1
                self._cond.notify_all()

    def _write(self, tier: Tier, key: bytes, value: Value) -> None:
        if not tier.available():
            return
        try:
            if tier.contains([key])[0]:
                return
            t0 = time.perf_counter()
            stored = tier.put(key, value)
            if stored:
                tier.stats.observe_write(time.perf_counter() - t0, len(value))
                if self._on_stored is not None:
                    self._on_stored(tier, key)
        except Exception:   # a dead tier must not kill the worker; the store fails open
            tier.failed()
