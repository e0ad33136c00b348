"""Per-endpoint hold: a routed request whose endpoint has no room waits for THAT endpoint, at the gateway.

Why (issue 21): flow control admits against the pool's room, and when that room was the signed sum of
the endpoints' rooms, the engine holding the hottest tenants' prefixes went over its threshold and its
negative room cancelled idle endpoints' room: requests bound for idle engines waited at the pool (252-317
of 2,422 on the held-out load, TTFT p90 1.42x flow control off). Now the pool's room is the sum of the
POSITIVE rooms (`Pool.free_slots`), the router keeps its affinity, and a request it sends to a full
endpoint waits here, in that endpoint's queue. While it waits it counts in the endpoint's load
(`Endpoint.held` -> `EndpointView.held`), so the router sees the pile and sends the next requests
elsewhere; without that count the hot tenant stayed on the hot engine (p90 3.6-4.0 s against ~1 s).

Each endpoint's queue is a `FlowController` over that endpoint's room (`Pool.room`): the pool's own
policy (priority bands, fair share between flows, shedding, deadline-aware admission at the endpoint's
pace, the bound on queued requests, the timeout, a client that leaves goes at once). It releases as the
endpoint's room frees: a request there ends (`completed`, `freed`) or its metrics refresh (`pump`). An
endpoint that turns unhealthy or leaves the pool hands its waiters back to be routed again (`Rerouted`)
at the next refresh, every `scrape_interval_s`. The pool-level queue stays for when no endpoint has room.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from inferstack.config.schema import FlowControlConfig
from inferstack.gateway.datalayer import Endpoint, Pool
from inferstack.gateway.flowcontrol import FlowController


class Rerouted(Exception):
    """The endpoint a request waited for became unhealthy or left the pool: route it again."""


class EndpointQueues:
    """One per pool: a hold queue per endpoint, made when first needed, dropped with its endpoint.
    ``on_depth(priority)``: a band's depth changed somewhere (the pool's depth gauge sums `depth`);
    ``on_held(endpoint id, held or None when it left)``: the per-endpoint gauge."""

    def __init__(self, cfg: FlowControlConfig, pool: Pool, on_depth: Callable[[int], None] | None = None,
                 on_held: Callable[[str, int | None], None] | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.on_depth = on_depth
        self.on_held = on_held
        self._queues: dict[str, tuple[Endpoint, FlowController]] = {}

    def queue(self, ep: Endpoint) -> FlowController:
        entry = self._queues.get(ep.id)
        if entry is None or entry[0] is not ep:
            if entry is not None:  # the same id, a new endpoint object: the old one left the pool
                self._drop(ep.id)
            fc = FlowController(self.cfg, partial(self.pool.room, ep), partial(self._changed, ep),
                                prior=partial(_own_pace, ep), engines_full=self.pool.engines_full)
            entry = self._queues[ep.id] = (ep, fc)
        return entry[1]

    def passes(self, ep: Endpoint, priority: int, room: Callable[[], int] | None = None) -> bool:
        """``ep`` takes a request of ``priority`` now: nothing to wait for. ``room``: ``ep``'s room as the
        caller's snapshot counts it (None: `Pool.room`, a fresh view)."""
        if not self.cfg.enabled:
            return True
        entry = self._queues.get(ep.id)
        fc = entry[1] if entry is not None and entry[0] is ep else self.queue(ep)
        return fc.queue.passes(priority, room)

    async def wait(self, ep: Endpoint, priority: int, flow_id: str, weight: float, timeout_s: float,
                   promised: float | None = None) -> float | None:
        """Wait for room at ``ep``. None: it has room now; else the seconds waited, and the request holds a
        reservation in `queue(ep)` until its `routed`. Raises APIError (429: shed, queue full, the wait would exceed the
        budget — not for a request the pool's queue released, ``promised``: `FairQueue.admit` —, timed out) or
        `Rerouted`; a cancelled task (client gone) leaves the queue at once."""
        if self.passes(ep, priority):
            return None
        ep.held += 1
        self._held(ep)
        try:
            return await self.queue(ep).wait(priority, flow_id, weight, timeout_s=timeout_s, promised=promised)
        finally:
            ep.held -= 1
            self._held(ep)

    def completed(self, ep: Endpoint) -> None:
        """``ep`` served a request: its queue's pace sample, then release its waiters."""
        entry = self._queues.get(ep.id)
        if entry is not None and entry[0] is ep:
            entry[1].completed()

    def freed(self, ep: Endpoint) -> None:
        """A request left ``ep`` unserved: release its waiters."""
        entry = self._queues.get(ep.id)
        if entry is not None and entry[0] is ep:
            entry[1].freed()

    def pump(self) -> None:
        """After a metrics refresh: release what each endpoint has room for; the waiters of an endpoint
        that is unhealthy or left the pool route again."""
        members = {id(e) for e in self.pool.endpoints}
        for key, (ep, fc) in list(self._queues.items()):
            if id(ep) not in members:
                self._drop(key)
            elif not ep.healthy:
                fc.evict(Rerouted)
            else:
                fc.pump()

    def depth(self, priority: int) -> int:
        """Requests of ``priority`` held at any endpoint of the pool."""
        return sum(fc.queue.depth(priority) for _, fc in self._queues.values())

    @property
    def queued(self) -> int:
        return sum(fc.queued for _, fc in self._queues.values())

    def _drop(self, key: str) -> None:
        ep, fc = self._queues.pop(key)
        fc.evict(Rerouted)
        if self.on_held is not None:
            self.on_held(ep.id, None)

    def _changed(self, ep: Endpoint, priority: int, _depth: int) -> None:
        if self.on_depth is not None:
            self.on_depth(priority)

    def _held(self, ep: Endpoint) -> None:
        entry = self._queues.get(ep.id)
        if self.on_held is not None and entry is not None and entry[0] is ep:  # a dropped one's series is gone
            self.on_held(ep.id, ep.held)


def _own_pace(ep: Endpoint) -> float | None:
    """The engine's own seconds per completion while full (`EngineDrain`), once it measured one."""
    return ep.drain_s if ep.drain.measured() else None
