"""Events in kernel-time order → connections → finished requests, with the counters an operator needs
to trust the numbers (segments, bytes seen vs captured, losses, desyncs, TLS connections)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from inferstack.observe.events import Accept, Close, Event, Lost, Segment
from inferstack.observe.exchange import Connection, ObservedRequest


@dataclass
class Counters:
    segments: int = 0
    bytes_moved: int = 0
    bytes_captured: int = 0
    connections: int = 0
    tls_connections: int = 0
    lost_events: int = 0
    requests: int = 0


class Reorder:
    """Per-CPU perf buffers are read one after another, so records reach us slightly out of time order:
    hold each event `lag_ns` behind the newest timestamp seen (or behind the clock: kernel timestamps are
    CLOCK_MONOTONIC, see `release`), then release in order."""

    def __init__(self, lag_ns: int) -> None:
        self.lag_ns = lag_ns
        self._heap: list[tuple[int, int, Event]] = []
        self._seq = itertools.count()
        self._newest = 0

    def push(self, ev: Event) -> list[Event]:
        heapq.heappush(self._heap, (ev.ts_ns, next(self._seq), ev))
        self._newest = max(self._newest, ev.ts_ns)
        return self._release(self._newest - self.lag_ns)

    def drain(self) -> list[Event]:
        return self._release(None)

    def release(self, now_ns: int) -> list[Event]:
        """Events older than `now_ns - lag_ns`: an idle stream still delivers its last events."""
        return self._release(now_ns - self.lag_ns)

    def _release(self, until: int | None) -> list[Event]:
        out = []
        while self._heap and (until is None or self._heap[0][0] <= until):
            out.append(heapq.heappop(self._heap)[2])
        return out


class Tracker:
    def __init__(self, on_request: Callable[[ObservedRequest], None], capture_bodies: bool = False,
                 on_tls: Callable[[int, int], None] | None = None) -> None:
        self.on_request, self.capture_bodies, self.on_tls = on_request, capture_bodies, on_tls
        self.conns: dict[tuple[int, int], Connection] = {}
        self.counters = Counters()
        self._desyncs_closed = 0
        self.last_ns = 0

    def handle(self, ev: Event | Lost) -> None:
        if isinstance(ev, Lost):
            self.counters.lost_events += ev.count
            return
        self.last_ns = max(self.last_ns, ev.ts_ns)
        key = (ev.pid, ev.fd)
        if isinstance(ev, Accept):
            self._close(key, ev.ts_ns)         # a missed close: the fd number was reused
            self.conns[key] = self._open(key, synced=True)
        elif isinstance(ev, Close):
            self._close(key, ev.ts_ns)
        else:
            self._segment(key, ev)

    def _open(self, key: tuple[int, int], synced: bool) -> Connection:
        self.counters.connections += 1
        return Connection(key[0], key[1], self._done, synced=synced, capture_bodies=self.capture_bodies)

    def _segment(self, key: tuple[int, int], ev: Segment) -> None:
        conn = self.conns.get(key)
        if conn is None:               # open before we attached: follow from the next message start
            conn = self.conns[key] = self._open(key, synced=False)
        c = self.counters
        c.segments += 1
        c.bytes_moved += ev.total
        c.bytes_captured += len(ev.data)
        was_tls = conn.tls
        conn.feed(ev.ts_ns, ev.inbound, ev.data, ev.total, ev.wire_ns)
        if conn.tls and not was_tls:
            c.tls_connections += 1
            if self.on_tls is not None:
                self.on_tls(*key)

    def _close(self, key: tuple[int, int], ts_ns: int, reason: str | None = None) -> None:
        conn = self.conns.pop(key, None)
        if conn is not None:
            conn.close(ts_ns, reason)
            self._desyncs_closed += conn.desyncs

    def _done(self, req: ObservedRequest) -> None:
        self.counters.requests += 1
        self.on_request(req)

    def finish(self, reason: str = "still running when observation ended") -> None:
        for key in list(self.conns):
            self._close(key, self.last_ns, reason)

    @property
    def desyncs(self) -> int:
        return self._desyncs_closed + sum(c.desyncs for c in self.conns.values())
