"""How fast one engine starts the requests waiting for it: its seconds per completion while full,
measured from its own counters (`vllm:request_success_total`) on each metrics scrape.

Flow control bounds an engine's own queue by this (`PoolSnapshot.queue_limit`): the engine's queue is
FIFO and beyond the gateway's reach, so it may hold only what the engine starts within
`flow_control.queue_wait_s`; the rest waits at the gateway, where priorities, fairness and
deadline-aware admission apply (docs/gateway.md, "When flow control queues, and how it releases").

The arithmetic is flow control's own `ServiceRate` (busy time between completions, averaged over at
least 32 of them and the last 60 s of busy time, a stall raising it at once), with "busy" meaning the
engine's previous scrape showed it full: requests waiting, or its running batch at its cap. Only then
does a completion say how fast a waiting request would start; an engine serving a light load completes
at the arrival rate, which says nothing about its capacity.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferstack.gateway.flowqueue import ServiceRate


class EngineDrain:
    """Per endpoint; fed by the scrape loop (never the request path)."""

    def __init__(self) -> None:
        self._t = 0.0
        self._rate = ServiceRate(now=lambda: self._t)
        self._finished: float | None = None

    def observe(self, t: float, finished: float | None, full: bool) -> None:
        """One scrape at monotonic time ``t``: the engine's finished-requests counter (None: it exports
        none) and whether it is full now (counts for the interval up to the next scrape)."""
        self._t = t
        if finished is None:
            return
        if self._finished is not None and finished >= self._finished:
            for _ in range(int(finished - self._finished)):
                self._rate.completed()  # counted only if the engine was full since the previous scrape
        self._finished = finished  # a smaller value: the engine restarted, count from here
        self._rate.queue_changed(1 if full else 0)

    def measured(self) -> bool:
        """At least one completion seen while full (before it, `seconds_per_completion` is only a lower bound)."""
        return self._rate.measured()

    def seconds_per_completion(self) -> float | None:
        """Mean busy seconds between the engine's completions while full (None: no evidence yet)."""
        return self._rate.seconds_per_release()


def engine_full(queue: float, running: float, batch_cap: int) -> bool:
    """Requests wait at the engine, or its running batch is at its cap (when it exports one)."""
    return queue > 0 or (batch_cap > 0 and running >= batch_cap)


def pool_drain_s(drains: Sequence[float | None]) -> float | None:
    """A pool's seconds per release from its healthy engines' own paces (`EngineDrain`): n engines at the
    measured ones' mean rate (engines of a pool are alike; one unmeasured yet is assumed as fast as the
    others). None when none is measured. Flow control's prior until its queue measures its own pace."""
    known = [d for d in drains if d is not None and d > 0]
    if not known:
        return None
    return 1.0 / (len(drains) * sum(1.0 / d for d in known) / len(known))
