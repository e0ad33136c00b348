"""The gateway's flow control as a pure, synchronous queue for virtual time.

`gateway/flowcontrol.py` owns the live policy but is written around asyncio futures and the wall
clock, so it cannot run inside a discrete-event loop. This module re-states its decisions over plain
data, rule for rule: pass straight through while the pool has room and nobody of equal or higher
priority waits; otherwise shed priority < 0 (429 ``shed``), refuse beyond ``max_queued`` (429
``queue_full``), else queue in the request's priority band; release highest band first and, inside a
band, the flow with the least virtual time (weighted fair sharing); a waiter that exceeds
``queue_timeout_s`` gets 429 ``queue_timeout``. Keep the two in step when either changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inferstack.config.schema import FlowControlConfig

T = TypeVar("T")


@dataclass
class _Flow(Generic[T]):
    waiters: deque[tuple[T, float]] = field(default_factory=deque)
    vtime: float = 0.0
    weight: float = 1.0


@dataclass
class _Band(Generic[T]):
    flows: dict[str, _Flow[T]] = field(default_factory=dict)
    clock: float = 0.0

    def __len__(self) -> int:
        return sum(len(f.waiters) for f in self.flows.values())


class Rejected(Exception):
    """The gateway would answer 429 with this code (shed, queue_full or queue_timeout)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class AdmissionQueue(Generic[T]):
    """One per pool. ``free_slots`` says how many requests the pool can take now (the same
    `PoolSnapshot.free_slots` / `pd_free_slots` the live gateway calls)."""

    def __init__(self, cfg: FlowControlConfig, free_slots: Callable[[], int]) -> None:
        self.cfg = cfg
        self.free_slots = free_slots
        self._bands: dict[int, _Band[T]] = {}
        self.queued = 0

    def _waiting_at_or_above(self, priority: int) -> bool:
        return any(len(b) for p, b in self._bands.items() if p >= priority)

    def admit(self, item: T, priority: int, flow_id: str, now: float, weight: float = 1.0) -> bool:
        """True: route ``item`` now. False: it waits (`release` hands it back later). Raises Rejected."""
        if not self.cfg.enabled:
            return True
        if not self._waiting_at_or_above(priority) and self.free_slots() > 0:
            return True
        if priority < 0:
            raise Rejected("shed")
        if self.queued >= self.cfg.max_queued:
            raise Rejected("queue_full")
        band = self._bands.setdefault(priority, _Band())
        flow = band.flows.get(flow_id)
        if flow is None:
            flow = band.flows[flow_id] = _Flow(vtime=band.clock, weight=weight)
        elif not flow.waiters:
            flow.vtime = max(flow.vtime, band.clock)
        flow.waiters.append((item, now))
        self.queued += 1
        return False

    def release(self) -> list[T]:
        """The queued items to route now, as many as there is room for (highest band first, then the
        flow with the least virtual time). Call whenever capacity may have freed up."""
        released: list[T] = []
        room = self.free_slots() if self.queued else 0
        while self.queued and room > 0:
            prio = max(p for p, b in self._bands.items() if len(b))
            band = self._bands[prio]
            flow = min((f for f in band.flows.values() if f.waiters), key=lambda f: f.vtime)
            item, _ = flow.waiters.popleft()
            self.queued -= 1
            flow.vtime += 1.0 / flow.weight
            band.clock = flow.vtime
            released.append(item)
            room -= 1
        self._drop_idle()
        return released

    def expire(self, now: float) -> list[T]:
        """Drop every waiter older than the queue timeout (the live gateway's per-request timer)."""
        out: list[T] = []
        for band in self._bands.values():
            for flow in band.flows.values():
                keep = deque(w for w in flow.waiters if now - w[1] <= self.cfg.queue_timeout_s)
                out += [w[0] for w in flow.waiters if now - w[1] > self.cfg.queue_timeout_s]
                flow.waiters = keep
        self.queued -= len(out)
        self._drop_idle()
        return out

    def _drop_idle(self) -> None:
        for p in [p for p, b in self._bands.items() if not len(b)]:
            del self._bands[p]     # bounded memory: idle bands and their flows go
