"""Flow control while a pool is saturated: strict priority bands, fair sharing between flows
(fairness ids, by default the tenant) inside a band, shedding of priority < 0, queue timeouts and a
bound on queued requests.

Requests pass straight through while the pool has room and nobody of equal or higher priority is
waiting. Otherwise they wait in their band; `pump()` releases them (highest band first, flows in
weighted round-robin by virtual time) as capacity frees up: on request completion and after each
metrics refresh.
"""

from __future__ import annotations

import asyncio
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
            released += 1
            room -= 1
            self.pending += 1
        for p in [p for p, b in self._bands.items() if not len(b)]:
            del self._bands[p]  # bounded memory: idle bands and their flows go
        return released

    def _depth(self, priority: int, band: _Band) -> None:
        if self.on_depth is not None:
            self.on_depth(priority, len(band))
