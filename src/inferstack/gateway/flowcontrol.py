"""Flow control while a pool is saturated: strict priority bands, fair sharing between flows
(fairness ids, by default the tenant) inside a band, shedding of priority < 0, queue timeouts and a
bound on queued requests.

Requests pass straight through while the pool has room and nobody of equal or higher priority is
waiting. Otherwise they wait in their band; `pump()` releases them (highest band first, flows in
weighted round-robin by virtual time) as capacity frees up: on request completion and after each
metrics refresh. A released request holds a reservation (`pending`) only until it is routed; from
then on it counts in its endpoint's in-flight, which the pool's room already subtracts.

NOTE (shedding at once): a request that would only time out in the queue is refused at arrival.
`DrainRate` measures how fast the queue empties (releases per second while it is non-empty); a
newcomer behind N requests of its priority or higher expects to wait N / rate, and when that
exceeds `queue_timeout_s` it gets 429 now, with that wait as Retry-After, instead of 429 after
`queue_timeout_s`. The timeout stays as the backstop for a drain that slows down later.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from inferstack.config.schema import FlowControlConfig
from inferstack.protocol.errors import APIError


@dataclass
class _Flow:
    waiters: deque[asyncio.Future] = field(default_factory=deque)
    vtime: float = 0.0
    weight: float = 1.0


@dataclass
class _Band:
    flows: dict[str, _Flow] = field(default_factory=dict)
    clock: float = 0.0  # virtual time of the last release, for flows that (re)join

    def __len__(self) -> int:
        return sum(len(f.waiters) for f in self.flows.values())


class DrainRate:
    """Releases per second from a queue, over the last `window_s` seconds in which it was busy."""

    def __init__(self, window_s: float = 10.0, now: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._now = now
        self._releases: deque[float] = deque()
        self._busy_since: float | None = None

    def queue_changed(self, queued: int) -> None:
        if queued and self._busy_since is None:
            self._busy_since = self._now()
        elif not queued:
            self._busy_since = None

    def released(self) -> None:
        self._releases.append(self._now())

    def expected_wait(self, ahead: int, timeout_s: float) -> float | None:
        """Seconds until a request behind ``ahead`` others is released, or None while there is too
        little to go on: the queue busy for under a second, or fewer than two releases in this busy
        period and less than half the timeout without any."""
        if self._busy_since is None:
            return None
        now = self._now()
        start = max(now - self.window_s, self._busy_since)
        while self._releases and self._releases[0] < start:
            self._releases.popleft()
        span = now - start
        if span < 1.0 or (len(self._releases) < 2 and span < timeout_s / 2):
            return None
        rate = len(self._releases) / span
        return (ahead + 1) / rate if rate > 0 else float("inf")


class FlowController:
    """One per pool. ``free_slots`` says how many requests may be released right now."""

    def __init__(self, cfg: FlowControlConfig, free_slots: Callable[[], int],
                 on_depth: Callable[[int, int], None] | None = None):
        self.cfg = cfg
        self.free_slots = free_slots
        self.on_depth = on_depth
        self._bands: dict[int, _Band] = {}
        self.queued = 0
        # released from the queue but not yet routed: their capacity is reserved
        self.pending = 0
        self.drain = DrainRate()

    def _waiting_at_or_above(self, priority: int) -> bool:
        return any(len(b) for p, b in self._bands.items() if p >= priority)

    async def admit(self, priority: int, flow_id: str, weight: float = 1.0) -> float | None:
        """Wait until the request may be routed. Returns None if it passed straight through, else
        the seconds it waited (then call `routed()` once it holds its endpoint). Raises APIError(429)."""
        if not self.cfg.enabled:
            return None
        if not self._waiting_at_or_above(priority) and self.free_slots() - self.pending > 0:
            return None
        if priority < 0:
            raise APIError(429, "The pool is saturated and this request's priority is sheddable.",
                           code="shed", headers={"retry-after": "1"})
        if self.queued >= self.cfg.max_queued:
            raise APIError(429, "Too many requests are queued at the gateway.", code="queue_full",
                           headers={"retry-after": "1"})
        ahead = sum(len(b) for p, b in self._bands.items() if p >= priority)
        wait = self.drain.expected_wait(ahead, self.cfg.queue_timeout_s)
        if wait is not None and wait > self.cfg.queue_timeout_s:
            raise APIError(429, f"The pool is saturated: the expected wait ({wait:.0f}s) exceeds the queue timeout "
                           f"({self.cfg.queue_timeout_s:g}s).", code="queue_timeout",
                           headers={"retry-after": str(min(60, math.ceil(wait)))})
        band = self._bands.get(priority)
        if band is None:
            band = self._bands[priority] = _Band()
        flow = band.flows.get(flow_id)
        if flow is None:
            flow = band.flows[flow_id] = _Flow(vtime=band.clock, weight=weight)
        elif not flow.waiters:
            flow.vtime = max(flow.vtime, band.clock)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        flow.waiters.append(fut)
        self.queued += 1
        self._depth(priority, band)
        start = time.monotonic()
        self.pump()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.cfg.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if not fut.done():
                fut.cancel()
                flow.waiters.remove(fut)
                self.queued -= 1
                self._depth(priority, band)
                if not len(band) and self._bands.get(priority) is band:
                    del self._bands[priority]  # bounded memory: idle bands and their flows go
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise APIError(429, f"Timed out after {self.cfg.queue_timeout_s:g}s waiting for capacity.",
                               code="queue_timeout", headers={"retry-after": "1"}) from None
            if isinstance(exc, asyncio.CancelledError):
                self.routed()
                raise
        return time.monotonic() - start

    def routed(self) -> None:
        """A released request now counts in its endpoint's in-flight (or went away)."""
        self.pending -= 1
        self.pump()

    def pump(self) -> int:
        """Release as many queued requests as there is room for; returns how many."""
        if not self.queued:
            return 0
        released = 0
        room = self.free_slots() - self.pending
        while room > 0 and self.queued:
            prio = max(p for p, b in self._bands.items() if len(b))
            band = self._bands[prio]
            flow = min((f for f in band.flows.values() if f.waiters), key=lambda f: f.vtime)
            fut = flow.waiters.popleft()
            flow.vtime += 1.0 / flow.weight
            band.clock = flow.vtime
            self.queued -= 1
            self._depth(prio, band)
            if fut.done():
                continue
            fut.set_result(None)
            self.drain.released()
            released += 1
            room -= 1
            self.pending += 1
        for p in [p for p, b in self._bands.items() if not len(b)]:
            del self._bands[p]  # bounded memory: idle bands and their flows go
        return released

    def _depth(self, priority: int, band: _Band) -> None:
        self.drain.queue_changed(self.queued)
        if self.on_depth is not None:
            self.on_depth(priority, len(band))
