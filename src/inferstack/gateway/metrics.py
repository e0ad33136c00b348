"""Gateway metrics (docs/architecture.md, "Metric names"): OTel GenAI names where they exist.

Label children are cached per label tuple so the hot path does one dict lookup per observation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_LAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 30.0, 60.0, 120.0)
_TOK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5)
_LABELS = ("model", "pool", "endpoint", "tenant")


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds", "Time to first token through the gateway.",
                              _LABELS, buckets=_LAT_BUCKETS, registry=r)
        self.tpot = Histogram("gen_ai_server_time_per_output_token_seconds",
                              "(E2E - TTFT) / (output tokens - 1), per request.", _LABELS,
                              buckets=_TOK_BUCKETS, registry=r)
        self.e2e = Histogram("gen_ai_server_request_duration_seconds", "End-to-end request duration.",
                             _LABELS, buckets=_LAT_BUCKETS, registry=r)
        self.itl = Histogram("inferstack_gateway_inter_token_latency_seconds",
                             "Gaps between streamed content chunks.", _LABELS, buckets=_TOK_BUCKETS, registry=r)
        self.requests = Counter("inferstack_gateway_requests", "Requests by final status.",
                                ("model", "pool", "endpoint", "tenant", "status"), registry=r)
        self.tokens = Counter("inferstack_gateway_tokens", "Tokens from upstream usage.",
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
        self.decisions = Counter("inferstack_gateway_routing_decisions",
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
        self._children: dict[tuple, tuple] = {}
        self._counters: dict[tuple, object] = {}

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

    def latency_children(self, labels: tuple[str, str, str, str]) -> tuple:
        c = self._children.get(labels)
        if c is None:
            c = (self.ttft.labels(*labels), self.tpot.labels(*labels), self.e2e.labels(*labels),
                 self.itl.labels(*labels))
            self._children[labels] = c
        return c

    def request_done(self, model: str, pool: str, endpoint: str, tenant: str, status: int) -> None:
        key = (0, model, pool, endpoint, tenant, status)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = self.requests.labels(model, pool, endpoint, tenant, str(status))
        c.inc()

    def tokens_used(self, model: str, pool: str, tenant: str, input_tokens: int, output_tokens: int) -> None:
        key = (2, model, pool, tenant)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = (self.tokens.labels(model, pool, tenant, "input"),
                                       self.tokens.labels(model, pool, tenant, "output"))
        c[0].inc(input_tokens)
        c[1].inc(output_tokens)

    def decision(self, pool: str, profile: str, scorer: str) -> None:
        key = (1, pool, profile, scorer)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = self.decisions.labels(pool, profile, scorer)
        c.inc()


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
