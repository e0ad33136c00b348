"""hold (scale from zero): a request for a pool with no ready endpoint waits here for a replica.

Only pools with `scale_from_zero` hold; others answer 503 at once as before. The wait is bounded
three ways: at most `max_held` requests (503 `cold_start_queue_full` beyond), a per-request deadline
(`timeout_s`, or less with the `x-inferstack-hold-timeout` header: 504 `cold_start_timeout`), and
the client itself (a client that hangs up is dropped at once, never served late). The held count is
the demand an autoscaler sees (`PoolLoad.held`) while the pool has no replica to report load.

The pipeline holds after resolve and before admission, so flow control (which would queue, then
shed, a request to an empty pool) only ever sees pools with a ready endpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferstack.autoscale.config import HoldConfig
from inferstack.gateway.datalayer import Pool
from inferstack.gateway.flowcontrol import ClientGone
from inferstack.protocol.errors import APIError

HOLD_TIMEOUT_HEADER = b"x-inferstack-hold-timeout"
_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class HoldMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.held = Gauge("inferstack_gateway_held_requests",
                          "Requests held for a replica while their pool has none ready (scale from zero).",
                          ("pool",), registry=registry)
        self.outcomes = Counter("inferstack_gateway_hold_outcomes",
                                "Held requests by outcome: released, deadline (504), client_gone, full (503).",
                                ("pool", "outcome"), registry=registry)
        self.wait = Histogram("inferstack_gateway_hold_wait_seconds",
                              "How long released requests waited for a replica (the cold start they saw).",
                              ("pool",), buckets=_WAIT_BUCKETS, registry=registry)


class Hold:
    """One per pool with `scale_from_zero`; `pump` (after each metrics refresh) wakes the waiters."""

    def __init__(self, pool: Pool, cfg: HoldConfig, metrics: HoldMetrics) -> None:
        self.pool = pool
        self.cfg = cfg
        self.metrics = metrics
        self.held = 0
        self._ready = asyncio.Event()

    def ready(self) -> bool:
        return any(e.healthy for e in self.pool.endpoints)

    def pump(self) -> None:
        if self.ready():
            self._ready.set()
        else:
            self._ready.clear()

    def _timeout(self, headers: Mapping[bytes, bytes]) -> float:
        raw = headers.get(HOLD_TIMEOUT_HEADER)
        if raw is None:
            return self.cfg.timeout_s
        try:
            asked = float(raw)
        except ValueError:
            raise APIError(400, f"{HOLD_TIMEOUT_HEADER.decode()} must be a number of seconds.",
                           param=HOLD_TIMEOUT_HEADER.decode()) from None
        return max(0.0, min(asked, self.cfg.timeout_s))

    async def wait(self, headers: Mapping[bytes, bytes], gone: asyncio.Future | None) -> float | None:
        """None when the pool is ready now, else the seconds waited for a replica. Raises APIError
        (503 full, 504 deadline) or ClientGone."""
        if self.ready():
            return None
        timeout = self._timeout(headers)
        name = self.pool.name
        if self.held >= self.cfg.max_held:
            self.metrics.outcomes.labels(name, "full").inc()
            raise APIError(503, f"Pool `{name}` is starting a replica and already holds {self.held} requests; "
                           "retry shortly.", code="cold_start_queue_full", headers={"retry-after": "5"})
        self.held += 1
        self.metrics.held.labels(name).set(self.held)
        start = time.monotonic()
        try:
            await self._until_ready(start + timeout, gone)
        finally:
            self.held -= 1
            self.metrics.held.labels(name).set(self.held)
        if gone is not None and gone.done():
            self.metrics.outcomes.labels(name, "client_gone").inc()
            raise ClientGone
        if not self.ready():
            self.metrics.outcomes.labels(name, "deadline").inc()
            raise APIError(504, f"No replica of pool `{name}` became ready within {timeout:g}s (it is scaling "
                           "from zero); retry shortly.", code="cold_start_timeout", headers={"retry-after": "5"})
        waited = time.monotonic() - start
        self.metrics.outcomes.labels(name, "released").inc()
        self.metrics.wait.labels(name).observe(waited)
        return waited

    async def _until_ready(self, deadline: float, gone: asyncio.Future | None) -> None:
        """Until an endpoint is ready, the client is gone or the deadline passed (an event set by a
        refresh may already be stale: the loop checks again)."""
        while not self.ready() and not (gone is not None and gone.done()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._ready.clear()
            ready = asyncio.ensure_future(self._ready.wait())
            try:
                waits = {ready} | ({gone} if gone is not None else set())
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
