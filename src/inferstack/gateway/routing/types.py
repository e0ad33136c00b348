"""Snapshots the policies read: one request and the pool's endpoints at one instant."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferstack.gateway.routing.columns import EndpointColumns

NEVER = float("inf")
# The per-request methods below write max(a, b) as ``b if b > a else a`` and min(a, b) as ``b if b < a else a``:
# the same value in every case (NaN included: the builtins keep the first argument unless the second compares
# greater / less), at a sixth of the builtins' cost (~180 ns a call in argument parsing; some 20 calls a request).
UNBOUNDED = 1 << 30  # room of an endpoint nothing can saturate (no metrics, no cap)


@dataclass(slots=True)
class EndpointView:
    """One endpoint as the router sees it. Scraped fields are from the engine's /metrics."""

    id: str
    queue: float = 0.0          # requests waiting in the engine
    running: float = 0.0        # requests running in the engine
    kv_usage: float = 0.0       # 0..1
    metrics_age_s: float = NEVER  # seconds since the last successful scrape
    has_metrics: bool = False   # the endpoint exports a known queue/KV metric family at all
    in_flight: int = 0          # requests this gateway has sent and not yet finished
    healthy: bool = True        # active health check passes and not passively ejected
    max_concurrency: int | None = None
    adapters_active: frozenset[str] = frozenset()
    adapters_waiting: frozenset[str] = frozenset()
    max_lora: int = 0
    # the engine's running-batch cap (`inferstack:max_num_seqs`), 0 when it does not export one
    batch_cap: int = 0
    # the endpoint exports a waiting or running count (not only KV use): in-flight can be compared to it
    reports_queue: bool = True
    # the engine's measured seconds per completion while it was full (`EngineDrain`), None while unknown
    drain_s: float | None = None
    # requests the gateway routed here that wait at the gateway for its room (`gateway.endpointflow`)
    held: int = 0

    def stale(self, stale_after_s: float) -> bool:
        return self.has_metrics and self.metrics_age_s > stale_after_s

    def queued_now(self, trust_free_slots: bool = True) -> float:
        """The engine's queue as of now: what it reported, plus the requests this gateway has in flight
        there beyond what the engine reported (sent, or finished, after its metrics were taken) that its
        running batch has no room for. Without a batch cap (engines that do not export
        `inferstack:max_num_seqs`) the running batch is assumed full and all of them wait; with one, they
        take the free batch slots first, as the engine's scheduler does, unless it already has a queue
        (then something else, such as KV space, holds it back and new requests wait too).

        NOTE (why the cap and not an "unseen" count): at thousands of requests a second a request lives
        for less than a scrape interval, so nearly all of what the gateway has in flight is newer than
        the engine's last report. Counting those as queued held an idle pool of fast engines at the
        queue threshold (flow control queued 2,990 of 3,000 requests at c64), and discounting them
        reopened the burst pile-up on CPU engines whose gauges lag a step. Only the engine knows how
        many it can start at once; see docs/gateway.md, "The saturation signal".

        ``trust_free_slots`` False (`PoolSnapshot.queued`: a slow engine) counts every unreported request
        as waiting: a CPU engine prefilling a long prompt reports one running for the whole step while
        its token budget, not its batch, holds the rest back."""
        if not self.reports_queue:
            return 0.0
        unreported = self.in_flight - self.running - self.queue
        free = 0.0
        if self.batch_cap and self.queue <= 0 and trust_free_slots:
            slots = self.batch_cap - self.running
            free = slots if slots > 0.0 else 0.0
        waiting = unreported - free
        return self.queue + (waiting if waiting > 0.0 else 0.0)

    def load(self) -> float:
        """Work at the endpoint: the gateway's own in-flight count, or the engine's if larger
        (other gateways send to it too), plus the requests held at the gateway for its room: they are
        bound for it, and a router that did not see them kept sending a hot tenant to its full engine."""
        own, reported = float(self.in_flight), self.queue + self.running
        return (reported if reported > own else own) + self.held


@dataclass(slots=True)
class PoolSnapshot:
    endpoints: Sequence[EndpointView]
    now: float = 0.0
    stale_after_s: float = 0.2
    queue_threshold: float = 5.0
    kv_threshold: float = 0.8
    # numpy columns mirroring ``endpoints`` (kept in step by the owner), for columnar routing; or None
    columns: EndpointColumns | None = None
    # longest an engine's own queue may take to start what the gateway sent it (see `queue_limit`)
    queue_wait_s: float = 1.0

    def saturation(self, e: EndpointView) -> float:
        """GIE's utilization detector, max(Q/q_thr, KV/kv_thr), over the queue as of *now*
        (`queued_now`), plus our in-flight cap. Unhealthy endpoints are saturated.

        NOTE (why in-flight counts): an engine's /metrics lags the requests the gateway sends, by a
        scrape interval or, on a CPU engine that updates its gauges once per multi-second step, by
        much more. Judging saturation on the scraped queue alone let one burst pile dozens of
        requests onto an engine that still reported an empty queue, and judging stale metrics as
        saturated (as was KV use that counts a full prefix cache) held a healthy, idle pool at zero
        in flight. The gateway's own in-flight count is always fresh, so requests the engine has not
        reported yet are assumed to wait in its queue until a scrape shows otherwise, beyond the free
        slots of its running batch when it exports the batch's cap (`queued_now`)."""
        if not e.healthy:
            return 1.0
        s = 0.0
        if self.has_live_metrics(e):
            limit = self.queue_limit(e)
            queued = e.queued_now(limit >= 1.0)  # `queued`, with the limit worked out once
            # KV use saturates only with requests waiting: engines count cached, evictable blocks
            # differently, and a full prefix cache on an idle engine is not a full engine
            s, kv = queued / limit, e.kv_usage / self.kv_threshold if queued > 0 else 0.0
            s = kv if kv > s else s
        if e.max_concurrency:
            capped = e.in_flight / e.max_concurrency
            s = capped if capped > s else s
        return s

    def queue_limit(self, e: EndpointView) -> float:
        """Requests that may wait in ``e``'s own queue: `queue_threshold`, and no more than the engine
        starts within `queue_wait_s` at its measured pace (`drain_s`, seconds per completion while full).

        NOTE (why a time bound): the engine's queue is FIFO and deaf to priorities, fairness and deadlines;
        once a request is in it the gateway can neither refuse nor reorder it. Five waiting requests start
        within milliseconds on a GPU but take minutes on a CPU engine finishing a request every 10-20 s,
        so a count alone let overload pile up where nothing could shed it (the README stack under 4x held
        requests without a first token for 70 s while the gateway saw room). Bounded by time, a slow
        engine keeps at most one request waiting (``room`` rounds up) and the rest queues at the gateway,
        where deadline-aware admission refuses at arrival what it cannot serve in time."""
        if e.drain_s is None or e.drain_s <= 0:
            return self.queue_threshold
        return max(1e-3, min(self.queue_threshold, self.queue_wait_s / e.drain_s))

    def queued(self, e: EndpointView) -> float:
        """``e``'s queue as of now (`queued_now`). Its free batch slots count only on an engine that starts
        at least one request within `queue_wait_s`: the gateway sends into a slow engine's free slots one
        request per report (its gauges move once per step, seconds on a CPU), since a batch slot is free
        there only if the token budget of its steps is too (a cold 2,048-token prefill takes the whole
        budget: the README stack's engines took 7 more requests into their FIFO that way)."""
        return e.queued_now(self.queue_limit(e) >= 1.0)

    def has_live_metrics(self, e: EndpointView) -> bool:
        """Metrics to judge saturation by: scraped, and not so old that the scrape is clearly
        failing (then the endpoint is judged like one without metrics, by its cap alone: fail open
        on performance, health checks handle dead endpoints)."""
        stale = 10 * self.stale_after_s
        return e.has_metrics and e.metrics_age_s <= (stale if stale > 2.0 else 2.0)

    def room(self, e: EndpointView) -> int:
        """Requests ``e`` may still take: the free part of its cap, and the queue left below the
        threshold when it has live metrics, which is negative when the queue is over it (or 0 at
        most while KV use saturates it). An endpoint with neither cannot saturate: UNBOUNDED."""
        if not e.healthy:
            return 0
        room = UNBOUNDED
        if e.max_concurrency:
            free = e.max_concurrency - e.in_flight
            room = free if free > 0 else 0
        if self.has_live_metrics(e):
            limit = self.queue_limit(e)
            queued = e.queued_now(limit >= 1.0)  # `queued`, with the limit worked out once
            left = math.ceil(limit - queued)
            if queued > 0 and e.kv_usage >= self.kv_threshold and left > 0:
                left = 0
            room = left if left < room else room
        return room

    def free_slots(self, include: Callable[[EndpointView], bool] | None = None, positive: bool = False) -> int:
        """How many queued requests flow control may release now, over the endpoints ``include``
        keeps (None: all): the pool's room, the sum of the endpoints' `room` (at least 0, at most UNBOUNDED).
        ``positive``: the sum of the positive rooms, where a request routed to a full endpoint waits for
        it (`gateway.endpointflow`): then one endpoint over its threshold holds back only its own requests.

        NOTE (why a sum, with negative terms): routers keep prefix and session affinity, so a hot
        endpoint may queue past the threshold while others have room. Its overflow counts against
        the pool's room, so admission holds once the pool as a whole waits for n x threshold, while
        routing stays free to keep a tenant where its prefix is cached. Restricting the router to
        endpoints with room instead broke affinity exactly under load and collapsed the hit rate
        (0.56 against 0.89 with flow control off on the held-out load)."""
        eps = self.endpoints if include is None else [e for e in self.endpoints if include(e)]
        if positive:  # a loop, not a generator: flow control asks this for every request it lets through
            total = 0
            for e in eps:
                r = self.room(e)
                if r > 0:
                    total += r
            return total if total < UNBOUNDED else UNBOUNDED
        return max(0, min(UNBOUNDED, sum(map(self.room, eps))))


@dataclass(slots=True)
class RequestView:
    """What routing needs from one request, computed once by the caller."""

    model: str
    prefix_hashes: Sequence[int] = ()   # approximate chain over the request text (see prefix.py)
    token_hashes: Sequence[bytes] = ()  # KV block hashes (precise index), when tokenized
    prompt_chars: int = 0
    adapter: str | None = None
    session: str | None = None
    priority: int = 0
    max_tokens: int = 64  # output tokens the request may produce (for latency prediction)

    @property
    def est_prompt_tokens(self) -> int:
        return max(1, self.prompt_chars // 4)
