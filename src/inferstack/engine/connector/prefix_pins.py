"""Cached prefix blocks a peer READs straight out of this engine (cross-replica KV reuse).

When the gateway's KV-event index says this engine holds the leading blocks of a prompt another
replica is about to run, that replica asks our transfer server for them by block hash
(``nixl_transport.py``: a NIXL_PULL carrying ``prefix`` hashes). The block pool belongs to the
engine thread, so the server thread only *asks*: the engine thread, at the start of its next
``schedule`` (`serve`), takes a reference on the longest run of leading blocks still cached
(``BlockPool.touch``: they can be neither evicted nor reused while pinned; full cached blocks are
never written) and holds them in the `PagedKVSource` under the pull's key, exactly like a finished
prefill's blocks in PD. When the pull ends (DONE, a dropped connection or the hold timeout) the
source releases the hold and the engine thread drops the references at its next ``schedule``.
An idle engine thread sleeps on its inbox: ``wake`` (set by `AsyncEngine`) gets it to run a step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from inferstack.engine.connector.transfer import PagedKVSource
from inferstack.engine.kv.block_pool import BlockPool


@dataclass
class _Ask:
    hashes: list[bytes]
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    pinned: int = 0


class PrefixPins:
    def __init__(self, source: PagedKVSource) -> None:
        self.source = source
        self._asks: dict[str, _Ask] = {}
        self._released: list[str] = []
        self._pinned: dict[str, list[int]] = {}     # engine thread only
        self._lock = threading.Lock()
        self._wake: Callable[[], None] = lambda: None

    def set_waker(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    # -- transfer-server threads ----------------------------------------------------------------
    def pin(self, key: str, hashes: Sequence[bytes], timeout_s: float) -> int:
        """Hold the longest run of leading cached blocks matching ``hashes`` under ``key`` (then
        ``source.open(key)`` describes them); the number of blocks pinned, 0 when none are cached
        or the engine thread did not answer within ``timeout_s``."""
        ask = _Ask(list(hashes))
        with self._lock:
            if key in self._asks:
                return 0
            self._asks[key] = ask
        self._wake()
        if not ask.done.wait(timeout_s):
            with self._lock:
                ask.cancelled = True
                self._asks.pop(key, None)
            return 0
        return ask.pinned

    def _on_release(self, key: str) -> None:
        with self._lock:
            self._released.append(key)
        self._wake()

    # -- engine thread --------------------------------------------------------------------------
    def serve(self, pool: BlockPool) -> None:
        """Unpin what was released, pin what was asked (called at the start of each schedule)."""
        with self._lock:
            released, self._released = self._released, []
            asks = [(k, a) for k, a in self._asks.items() if not a.cancelled]
            self._asks.clear()
        for key in released:
            blocks = self._pinned.pop(key, None)
            if blocks:
                pool.free(reversed(blocks))
        for key, ask in asks:
            blocks: list[int] = []
            for block_hash in ask.hashes:
                block = pool.get_cached_block(block_hash)
                if block is None:
                    break
                blocks.append(block)
            if blocks and key not in self._pinned and self.source.hold(
                    key, list(blocks), ask.hashes[:len(blocks)], on_release=self._on_release):
                pool.touch(blocks)
                self._pinned[key] = blocks
            else:
                blocks = []  # nothing cached, or the key is held already (a repeated pull): pin nothing
            ask.pinned = len(blocks)
            ask.done.set()

    def num_pinned(self) -> int:
        return len(self._pinned)
