"""TieredKVStore: chunks of KV across host RAM, local disk and Redis, looked up as a prefix.

Reads check tiers fastest first; a chunk found in a slower tier is promoted to the faster ones in
the background. Writes go to every tier through the write-back worker. Every read is validated
(codec header + checksum); a corrupt chunk counts as a miss, is deleted from that tier and the
next tier is tried. Any tier error is counted and treated as a miss: a dead tier makes serving
slower, never wrong.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from inferstack.kvstore.codec import ChunkBuffer, ChunkLayout, CorruptChunk, decode_chunk
from inferstack.kvstore.settings import DEFAULT_WRITEBACK_QUEUE_BYTES
from inferstack.kvstore.tiers.base import Tier, Value
from inferstack.kvstore.writeback import WriteBack

PENDING = "pending"   # a chunk still in the write-back queue: as fast as host RAM


@dataclass(frozen=True)
class LookupResult:
    num_chunks: int            # leading chunks available somewhere
    tiers: tuple[str, ...]     # which tier serves each of them (fastest that has it)
    seconds: float


@dataclass(frozen=True)
class StoreEvent:
    """A chunk appeared in or left a tier; the engine turns these into KV events (``medium``)."""

    kind: Literal["stored", "removed"]
    medium: str
    keys: tuple[bytes, ...]


class TieredKVStore:
    def __init__(self, tiers: Sequence[Tier], layout: ChunkLayout, root: bytes,
                 writeback_queue_bytes: int = DEFAULT_WRITEBACK_QUEUE_BYTES, promote: bool = True) -> None:
        if not tiers:
            raise ValueError("a KV store needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate KV tiers: {names}")
        self.tiers = list(tiers)
        self.layout = layout
        self.root = root
        self.promote = promote
        self._listeners: list[Callable[[StoreEvent], None]] = []
        self._listeners_lock = threading.Lock()
        for tier in self.tiers:
            tier.on_evict = lambda keys, t=tier: self._emit(StoreEvent("removed", t.medium, tuple(keys)))
        self.writeback = WriteBack(writeback_queue_bytes,
                                   on_stored=lambda t, k: self._emit(StoreEvent("stored", t.medium, (k,))))
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-prefetch")

    # -- events ---------------------------------------------------------------------------------
    def add_listener(self, listener: Callable[[StoreEvent], None]) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def _emit(self, event: StoreEvent) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    # -- lookup ---------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """How many leading ``keys`` are stored, and the fastest tier holding each."""
        t0 = time.perf_counter()
        where: list[str | None] = [PENDING if p else None for p in self.writeback.pending(keys)]
        for tier in self.tiers:
            # A slower tier may fill a faster tier's gap, so each tier is asked about every key
            # still unresolved (one batched call per tier).
            todo = [i for i, w in enumerate(where) if w is None]
            if not todo:
                break
            if not tier.available():
                continue
            try:
                present = tier.contains([keys[i] for i in todo])
            except Exception:
                tier.failed()
                continue
            for i, ok in zip(todo, present, strict=True):
                if ok:
                    where[i] = tier.name
        n = 0
        while n < len(where) and where[n] is not None:
            n += 1
        return LookupResult(num_chunks=n, tiers=tuple(w for w in where[:n] if w is not None),
                            seconds=time.perf_counter() - t0)

    # -- read -----------------------------------------------------------------------------------
    def get(self, key: bytes) -> torch.Tensor | None:
        """One chunk as a ``[L, 2, T, H, D]`` tensor view, validated; None if no tier has it."""
        return self._fetch(key)

    def load(self, keys: Sequence[bytes]) -> Iterator[torch.Tensor]:
        """Yield the chunks of ``keys`` in order, stopping at the first one no tier can serve.

        The next chunk is fetched and verified on a background thread while the caller copies the
        current one into its KV blocks, so tier I/O overlaps the copy.
        """
        if not keys:
            return
        nxt: Future[torch.Tensor | None] = self._prefetch.submit(self._fetch, keys[0])
        for i in range(len(keys)):
            chunk = nxt.result()
            if chunk is None:
                return
            if i + 1 < len(keys):
                nxt = self._prefetch.submit(self._fetch, keys[i + 1])
            yield chunk

    def _fetch(self, key: bytes) -> torch.Tensor | None:
        value = self.writeback.peek(key)
        if value is not None:
            return decode_chunk(value, key=key, root=self.root, layout=self.layout)
        for idx, tier in enumerate(self.tiers):
            if not tier.available():
                continue
            t0 = time.perf_counter()
            try:
                value = tier.get(key)
            except Exception:
                tier.failed()
                tier.stats.add(misses=1)
                continue
            if value is None:
                tier.stats.add(misses=1)
                continue
            try:
                chunk = decode_chunk(value, key=key, root=self.root, layout=self.layout)
            except CorruptChunk:
                tier.stats.add(corrupt=1, misses=1)
                self._drop(tier, key)
                continue
            tier.stats.observe_read(time.perf_counter() - t0, len(value))
            if self.promote and idx > 0:
                self.writeback.submit(key, value, self.tiers[:idx])
            return chunk
        return None

    def _drop(self, tier: Tier, key: bytes) -> None:
        try:
            tier.delete(key)
        except Exception:
            tier.failed()
            return
        self._emit(StoreEvent("removed", tier.medium, (key,)))

    # -- write ----------------------------------------------------------------------------------
    def new_buffer(self) -> ChunkBuffer:
        """A buffer to copy one chunk's KV into, then ``put``."""
        return ChunkBuffer(self.layout)

    def put(self, key: bytes, chunk: ChunkBuffer) -> bool:
        """Seal and queue a chunk for every tier; False if back-pressure dropped it."""
        if chunk.layout != self.layout:
            raise ValueError(f"chunk layout {chunk.layout} does not match the store's {self.layout}")
        return self.put_encoded(key, chunk.seal(key, self.root))

    def put_encoded(self, key: bytes, value: Value) -> bool:
        return self.writeback.submit(key, value, self.tiers)

    def flush(self, timeout: float = 60.0) -> bool:
        return self.writeback.flush(timeout)

    def close(self) -> None:
        self.writeback.close()
        self._prefetch.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()
