"""KVStoreConnector: load the longest stored prefix from the KV tiers, save new full chunks.

Loads are staged: at scheduling time the connector looks the request's chunk keys up across the
tiers (metadata only), then reads and verifies the hit chunks into host memory — right away when
they sit in host RAM, otherwise on a background thread while the scheduler runs other requests
(it answers None until the read is done) — so the number of tokens it offers is exactly what it
holds. A tier that fails or returns a corrupt chunk shortens the offer (the rest is recomputed,
the failure counted); the copy into KV blocks before the forward pass then cannot fail. Saves gather
each newly completed 256-token chunk out of the KV blocks on the step loop (one copy) and hand it
to the store, whose write-back thread does all tier I/O.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from inferstack.engine.connector.base import KVConnectorBase
from inferstack.engine.connector.blocks import (
    StagedLoad,
    Stager,
    gather_blocks,
    scatter_into_blocks,
)
from inferstack.engine.connector.stats import ConnectorStats
from inferstack.engine.kv.events import BlockRemoved, BlockStored, KVEvent
from inferstack.engine.kv.hashing import BLOCKS_PER_CHUNK, chunk_keys
from inferstack.engine.request import Request
from inferstack.kvstore.store import StoreEvent, TieredKVStore

MAX_EVENT_META = 16_384     # chunks whose hashes and tokens we remember for KV events (~32 MB at most)
MAX_PENDING_EVENTS = 100_000
FAST_TIERS = {"pending", "host"}   # read synchronously; slower tiers are read on a background thread


class KVStoreConnector(KVConnectorBase):
    def __init__(self, store: TieredKVStore, block_size: int = 16, min_load_tokens: int = 1) -> None:
        self.store = store
        self.block_size = block_size
        self.chunk_tokens = block_size * BLOCKS_PER_CHUNK
        if store.layout.tokens != self.chunk_tokens:
            raise ValueError(f"store chunks hold {store.layout.tokens} tokens, the engine's are {self.chunk_tokens}")
        self.min_load_tokens = min_load_tokens
        self.stats = ConnectorStats()
        self._stager = Stager()
        self._saved_upto: dict[str, int] = {}   # request id -> chunks known to be in the store
        self._kv_caches: list[torch.Tensor] = []
        # chunk key -> (its 16 block hashes, parent hash, 256 token ids), for tier KV events.
        self._chunk_meta: OrderedDict[bytes, tuple[list[bytes], bytes | None, bytes]] = OrderedDict()
        self._events: list[KVEvent] = []
        self._events_lock = threading.Lock()
        store.add_listener(self._on_store_event)

    # -- scheduler side -------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        bs, per_chunk = self.block_size, BLOCKS_PER_CHUNK
        rid = request.request_id
        first_block = num_computed_tokens // bs
        staged = self._stager.check(rid, first_block, bs)
        if staged == Stager.PENDING:
            return None, True                  # still reading: the scheduler runs others meanwhile
        if staged is not None:
            return staged, False               # staged earlier (read finished, or no free blocks then)
        max_blocks = (request.num_tokens - 1) // bs           # one token is always computed (logits)
        first_chunk = first_block // per_chunk
        # Chunks before the device hit were computed (hence saved) by some engine already.
        self._note_stored(rid, first_chunk)
        keys = chunk_keys(request.block_hashes)[: -(-max_blocks // per_chunk)]
        if first_block >= max_blocks or first_chunk >= len(keys):
            return 0, False
        t0 = time.perf_counter()
        found = self.store.lookup(keys[first_chunk:])
        self.stats.observe("lookup_seconds", time.perf_counter() - t0)
        self._note_stored(rid, first_chunk + found.num_chunks)
        end_block = min((first_chunk + found.num_chunks) * per_chunk, max_blocks)
        if (end_block - first_block) * bs < max(self.min_load_tokens, 1):
            return 0, False
        n_chunks = -(-end_block // per_chunk) - first_chunk
        wanted = keys[first_chunk:first_chunk + n_chunks]

        def fetch() -> StagedLoad | None:
            t0 = time.perf_counter()
            chunks = list(self.store.load(wanted))
            self.stats.observe("fetch_seconds", time.perf_counter() - t0)
            end = end_block
            if len(chunks) < n_chunks:
                # Lookup said present, read said otherwise: corrupt, evicted meanwhile or a tier error.
                self.stats.add(load_failures=1)
                end = min(end, (first_chunk + len(chunks)) * per_chunk)
            return StagedLoad(first_block, end - first_block, chunks) if end > first_block else None

        if set(found.tiers[:n_chunks]) <= FAST_TIERS:
            self._stager.put(rid, fetch())     # RAM: cheaper to copy now than to wait a step
        else:
            self._stager.start(rid, fetch)
        staged = self._stager.check(rid, first_block, bs)
        return (None, True) if staged == Stager.PENDING else (staged or 0, False)

    def _note_stored(self, request_id: str, num_chunks: int) -> None:
        self._saved_upto[request_id] = max(self._saved_upto.get(request_id, 0), num_chunks)

    def update_state_after_alloc(self, request: Request, block_ids: Sequence[int], num_external_tokens: int) -> None:
        loaded = self._stager.accept(request.request_id, block_ids, num_external_tokens, self.block_size)
        if loaded:
            self.stats.add(loaded_tokens=loaded)

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        self._stager.drop(request.request_id)
        self._saved_upto.pop(request.request_id, None)
        return False, None

    # -- worker side ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self._kv_caches = list(kv_caches)

    def start_load_kv(self) -> None:
        seconds = self._stager.load_into(self._kv_caches, self.block_size)
        if seconds is not None:
            self.stats.observe("load_seconds", seconds)

    def save_kv(self, seqs: Sequence[Any]) -> None:
        """Save every chunk that this step completed (its 256 tokens now all computed)."""
        t0, saved = time.perf_counter(), 0
        for seq in seqs:
            request: Request = seq.request
            computed_chunks = (seq.start + seq.num_new_tokens) // self.chunk_tokens
            have = self._saved_upto.get(request.request_id, 0)
            if computed_chunks <= have:
                continue
            keys = chunk_keys(request.block_hashes)
            if len(keys) < computed_chunks:
                continue    # hashes not extended yet (prefix caching off): the next step saves it
            for c in range(have, computed_chunks):
                self._remember(request, c, keys[c])
                saved += self.save_chunk(keys[c], seq.block_ids[c * BLOCKS_PER_CHUNK:(c + 1) * BLOCKS_PER_CHUNK])
            self._saved_upto[request.request_id] = computed_chunks
        if saved:
            self.stats.observe("save_seconds", time.perf_counter() - t0)

    # -- KV events ------------------------------------------------------------------------------
    def _remember(self, request: Request, chunk: int, key: bytes) -> None:
        lo, hi = chunk * BLOCKS_PER_CHUNK, (chunk + 1) * BLOCKS_PER_CHUNK
        tokens = np.asarray(request.all_token_ids[lo * self.block_size:hi * self.block_size], dtype="<u4").tobytes()
        with self._events_lock:
            self._chunk_meta[key] = (list(request.block_hashes[lo:hi]), request.block_hashes[lo - 1] if lo else None,
                                     tokens)
            while len(self._chunk_meta) > MAX_EVENT_META:
                self._chunk_meta.popitem(last=False)

    def _on_store_event(self, event: StoreEvent) -> None:
        """Runs on store threads: translate to vLLM KV events and queue them for the step loop."""
        medium = event.medium if event.medium in ("host", "disk", "remote") else "host"
        out: list[KVEvent] = []
        with self._events_lock:
            for key in event.keys:
                meta = self._chunk_meta.get(key)
                hashes = meta[0] if meta else [key]
                if event.kind == "stored":
                    if meta is None:
                        continue   # a promotion of a chunk we never saw computed: nothing to describe
                    tokens = np.frombuffer(meta[2], dtype="<u4").tolist()
                    out.append(BlockStored(hashes, meta[1], tokens, self.block_size, medium=medium))
                else:
                    out.append(BlockRemoved(hashes, medium=medium))
            self._events.extend(out)
            if len(self._events) > MAX_PENDING_EVENTS:     # nobody drains them: keep the newest
                del self._events[: len(self._events) - MAX_PENDING_EVENTS]

    def take_events(self) -> list[KVEvent]:
        with self._events_lock:
            events, self._events = self._events, []
        return events

    # -- direct primitives (benchmarks, tools) --------------------------------------------------
    def save_chunk(self, key: bytes, block_ids: Sequence[int]) -> int:
        buf = self.store.new_buffer()
        gather_blocks(self._kv_caches, block_ids, buf.tensor)
        if self.store.put(key, buf):
            self.stats.add(saved_chunks=1)
            return 1
        self.stats.add(save_dropped=1)
        return 0

    def load_kv(self, block_ids: Sequence[int], keys: Sequence[bytes]) -> int:
        """Load chunks ``keys`` into ``block_ids`` (16 per chunk); returns chunks loaded."""
        n = 0
        for i, chunk in enumerate(self.store.load(keys)):
            scatter_into_blocks(self._kv_caches, block_ids[i * BLOCKS_PER_CHUNK:(i + 1) * BLOCKS_PER_CHUNK], chunk)
            n += 1
        return n

    def shutdown(self) -> None:
        self._stager.shutdown()
        self.store.close()
