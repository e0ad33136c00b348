"""Gateway metrics (docs/architecture.md, "Metric names"): OTel GenAI names where they exist.

The per-request metrics (latency histograms, request, token and decision counters) are tallied: the hot path
adds to plain per-label-tuple numbers (`HistTally`, `CountTally`) with no lock and no prometheus_client call,
and each metric sets its children from its tallies when it is collected (`_Tallied.collect`), so every scrape
sees every request counted so far, exactly (the same float additions in the same order). A tallied child is
written by its tally only.
"""

from __future__ import annotations

import contextlib
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial, reduce
from math import isnan
from operator import add
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_LAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 30.0, 60.0, 120.0)
_TOK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5)
_LABELS = ("model", "pool", "endpoint", "tenant")


class HistTally:
    """One histogram child's observations since start: bucket counts (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.sum += v
        if v == v:  # NaN falls in no bucket, as with prometheus_client
            self.counts[bisect_left(self._bounds, v)] += 1

    def observe_many(self, values: Sequence[float]) -> None:
        """`observe` each of ``values`` in order (the bucket search and the sum run at C speed)."""
        if any(map(isnan, values)):
            for v in values:
                self.observe(v)
            return
        self.sum = reduce(add, values, self.sum)
        counts = self.counts
        for i in map(partial(bisect_left, self._bounds), values):
            counts[i] += 1


class CountTally:
    """One counter child's total since start."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def inc(self, amount: int = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.n += amount


class _Tallied:
    """Mixed into a prometheus_client metric: ``tally(labels)`` is the hot path's stand-in for ``labels(...)``,
    and collecting sets each tallied child from its tally. Setting (not adding) the running totals needs no
    reset, so a scrape from another thread (the endpoint picker's metrics server) never races the event loop:
    the loop only adds to tallies, a scrape only reads them (under a lock against a second scrape)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tallies: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._fold_lock = threading.Lock()

    def tally(self, labels: tuple[str, ...]) -> Any:
        got = self._tallies.get(labels)
        if got is None:
            child = self.labels(*labels)  # type: ignore[attr-defined]
            got = self._tallies[labels] = (self._new_tally(child), child)
        return got[0]

    def collect(self) -> Any:
        with self._fold_lock:
            for t, child in list(self._tallies.values()):
                self._fold(t, child)
        return super().collect()  # type: ignore[misc]


class TalliedHistogram(_Tallied, Histogram):
    @staticmethod
    def _new_tally(child: Histogram) -> HistTally:
        return HistTally(tuple(child._upper_bounds))

    @staticmethod
    def _fold(t: HistTally, child: Histogram) -> None:
        for value, n in zip(child._buckets, list(t.counts), strict=True):
            value.set(n)
        child._sum.set(t.sum)


class TalliedCounter(_Tallied, Counter):
    @staticmethod
    def _new_tally(child: Counter) -> CountTally:
        return CountTally()

    @staticmethod
    def _fold(t: CountTally, child: Counter) -> None:
        child._value.set(t.n)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = TalliedHistogram("gen_ai_server_time_to_first_token_seconds",
                                     "Time to first token through the gateway.", _LABELS, buckets=_LAT_BUCKETS,
                                     registry=r)
        self.tpot = TalliedHistogram("gen_ai_server_time_per_output_token_seconds",
                                     "(E2E - TTFT) / (output tokens - 1), per request.", _LABELS,
                                     buckets=_TOK_BUCKETS, registry=r)
        self.e2e = TalliedHistogram("gen_ai_server_request_duration_seconds", "End-to-end request duration.",
                                    _LABELS, buckets=_LAT_BUCKETS, registry=r)
        self.itl = TalliedHistogram("inferstack_gateway_inter_token_latency_seconds",
                                    "Gaps between streamed content chunks.", _LABELS, buckets=_TOK_BUCKETS,
                                    registry=r)
        self.requests = TalliedCounter("inferstack_gateway_requests", "Requests by final status.",
                                       ("model", "pool", "endpoint", "tenant", "status"), registry=r)
        self.tokens = TalliedCounter("inferstack_gateway_tokens", "Tokens from upstream usage.",
                                     ("model", "pool", "tenant", "type"), registry=r)
        self.queue_depth = Gauge("inferstack_gateway_queue_depth", "Requests waiting in flow control.",
                                 ("pool", "priority"), registry=r)
        self.endpoint_held = Gauge("inferstack_gateway_endpoint_held",
                                   "Requests routed to an endpoint without room, waiting at the gateway for it "
                                   "(also in inferstack_gateway_queue_depth).", ("pool", "endpoint"), registry=r)
        self.endpoint_wait = Histogram("inferstack_gateway_endpoint_wait_seconds",
                                       "Time routed requests waited at the gateway for their endpoint's room.",
                                       ("pool",), buckets=_LAT_BUCKETS, registry=r)
        self.queue_wait = Histogram("inferstack_gateway_queue_wait_seconds", "Time spent in flow control.",
                                    ("pool",), buckets=_LAT_BUCKETS, registry=r)
        self.shed = Counter("inferstack_gateway_shed", "Requests shed or timed out in flow control.",
                            ("pool", "reason"), registry=r)
        self.retries = Counter("inferstack_gateway_retries", "Upstream attempts retried on another endpoint.",
                               ("pool", "endpoint", "reason"), registry=r)
        self.decisions = TalliedCounter("inferstack_gateway_routing_decisions",
                                        "Routing decisions by profile and the scorer that decided.",
                                        ("pool", "profile", "scorer"), registry=r)
        self.rate_limited = Counter("inferstack_gateway_rate_limited", "Requests refused by RPM/TPM limits.",
                                    ("tenant", "limit"), registry=r)
        self.dependency_unavailable = Counter(
            "inferstack_gateway_dependency_unavailable",
            "Requests that met a failed dependency (audit_log, limit_store), by what the gateway did "
            "(refused: 503; allowed: served without it, per the configured policy).",
            ("dependency", "action"), registry=r)
        self.spillover = Counter("inferstack_gateway_spillover",
                                 "Requests sent to a pool's spill-over fallback, by why the pool could not take "
                                 "them (no_replica, saturated).", ("pool", "fallback", "reason"), registry=r)
        self._children: dict[tuple, tuple[HistTally, HistTally, HistTally, HistTally]] = {}
        self._counters: dict[tuple, Any] = {}

    def set_endpoint_held(self, pool: str, endpoint: str, held: int | None) -> None:
        """`inferstack_gateway_endpoint_held`; None: the endpoint left the pool (its series goes too, so the
        label set stays bounded by the pool's endpoints)."""
        if held is not None:
            self.endpoint_held.labels(pool, endpoint).set(held)
            return
        with contextlib.suppress(KeyError):
            self.endpoint_held.remove(pool, endpoint)

    def track_in_flight(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Export `inferstack_gateway_in_flight{pool,endpoint}` read from ``source`` at scrape time
        (the endpoints' own counters), so the hot path updates nothing extra."""
        self.registry.register(_InFlight(source))

    def latency_children(self, labels: tuple[str, str, str, str]) -> tuple[HistTally, HistTally, HistTally, HistTally]:
        """The (ttft, tpot, e2e, itl) tallies of one label tuple."""
        c = self._children.get(labels)
        if c is None:
            c = (self.ttft.tally(labels), self.tpot.tally(labels), self.e2e.tally(labels), self.itl.tally(labels))
            self._children[labels] = c
        return c

    def request_done(self, model: str, pool: str, endpoint: str, tenant: str, status: int) -> None:
        key = (0, model, pool, endpoint, tenant, status)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = self.requests.tally((model, pool, endpoint, tenant, str(status)))
        c.n += 1

    def tokens_used(self, model: str, pool: str, tenant: str, input_tokens: int, output_tokens: int) -> None:
        key = (2, model, pool, tenant)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = (self.tokens.tally((model, pool, tenant, "input")),
                                       self.tokens.tally((model, pool, tenant, "output")))
        c[0].inc(input_tokens)
        c[1].inc(output_tokens)

    def decision(self, pool: str, profile: str, scorer: str) -> None:
        key = (1, pool, profile, scorer)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = self.decisions.tally((pool, profile, scorer))
        c.n += 1


class _InFlight:
    """Collector for the gateway's in-flight requests per endpoint (read at scrape time)."""

    NAME, HELP, LABELS = "inferstack_gateway_in_flight", "Requests in flight per endpoint.", ("pool", "endpoint")

    def __init__(self, source: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.source = source

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=list(self.LABELS))]

    def doc_row(self) -> tuple[str, str, tuple[str, ...], str]:
        return self.NAME, "gauge", self.LABELS, self.HELP

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily(self.NAME, self.HELP, labels=list(self.LABELS))
        for pool, endpoint, n in self.source():
            fam.add_metric([pool, endpoint], n)
        yield fam
