"""Prometheus metrics of an observed server: the gateway's names (docs/metrics.md) with `source="ebpf"`,
so dashboards and alerts written for the gateway read them unchanged, plus the capture's own health."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inferstack.gateway.metrics import _LAT_BUCKETS, _TOK_BUCKETS
from inferstack.observe.exchange import ObservedRequest
from inferstack.observe.tracker import Counters

_LABELS = ("model", "pool", "endpoint", "tenant", "source")


class _CaptureCollector(Collector):
    """The tracker's counters, read at scrape time (they live in the reader thread's objects)."""

    def __init__(self, counters: Callable[[], tuple[Counters, int]]) -> None:
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c, desyncs = self.counters()
        yield CounterMetricFamily("inferstack_observe_segments", "Syscall segments (one iovec each) seen on "
                                  "watched connections.", value=c.segments)
        b = CounterMetricFamily("inferstack_observe_bytes", "Bytes moved on watched connections, and the "
                                "part captured.", labels=["kind"])
        b.add_metric(["moved"], c.bytes_moved)
        b.add_metric(["captured"], c.bytes_captured)
        yield b
        yield CounterMetricFamily("inferstack_observe_lost_events", "Perf-buffer records bpftrace reported "
                                  "lost (raise --buffer-pages).", value=c.lost_events)
        yield CounterMetricFamily("inferstack_observe_connections", "Connections followed.", value=c.connections)
        yield CounterMetricFamily("inferstack_observe_tls_connections", "Connections that started a TLS "
                                  "handshake (not decoded: plain HTTP only).", value=c.tls_connections)
        yield GaugeMetricFamily("inferstack_observe_desyncs", "Times HTTP framing was lost (bytes beyond "
                                "the capture) and resynchronised.", value=desyncs)


class ObserveMetrics:
    def __init__(self, endpoint: str, counters: Callable[[], tuple[Counters, int]]) -> None:
        self.registry = r = CollectorRegistry()
        self.endpoint = endpoint
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds", "Time to first token (eBPF: "
                              "request read to first content chunk written).", _LABELS, buckets=_LAT_BUCKETS,
                              registry=r)
        self.tpot = Histogram("gen_ai_server_time_per_output_token_seconds", "(E2E - TTFT) / (output tokens "
                              "- 1), per request.", _LABELS, buckets=_TOK_BUCKETS, registry=r)
        self.e2e = Histogram("gen_ai_server_request_duration_seconds", "End-to-end request duration.",
                             _LABELS, buckets=_LAT_BUCKETS, registry=r)
        self.itl = Histogram("inferstack_gateway_inter_token_latency_seconds", "Gaps between streamed content "
                             "chunks.", _LABELS, buckets=_TOK_BUCKETS, registry=r)
        self.requests = Counter("inferstack_gateway_requests", "Requests by final status.",
                                ("model", "pool", "endpoint", "tenant", "status", "source"), registry=r)
        self.tokens = Counter("inferstack_gateway_tokens", "Tokens from the response's usage (or counted "
                              "chunks).", ("model", "pool", "tenant", "type", "source"), registry=r)
        r.register(_CaptureCollector(counters))

    def observe(self, req: ObservedRequest) -> None:
        """One finished OpenAI-style request, timed as in inferstack.bench.records."""
        model = req.model or "unknown"
        labels = (model, "", self.endpoint, "", "ebpf")
        status = str(req.status_code) if not req.error else "incomplete"
        self.requests.labels(model, "", self.endpoint, "", status, "ebpf").inc()
        if req.error or not 200 <= req.status_code < 300:
            return
        end = req.chunk_ns[-1] if req.chunk_ns else req.end_ns
        e2e = (end - req.arrival_ns) / 1e9
        self.e2e.labels(*labels).observe(e2e)
        out = req.output_tokens
        self.tokens.labels(model, "", "", "output", "ebpf").inc(out)
        if req.prompt_tokens is not None:
            self.tokens.labels(model, "", "", "input", "ebpf").inc(req.prompt_tokens)
        if req.streamed and req.chunk_ns:
            ttft = (req.chunk_ns[0] - req.arrival_ns) / 1e9
            self.ttft.labels(*labels).observe(ttft)
            if out > 1:
                self.tpot.labels(*labels).observe((e2e - ttft) / (out - 1))
            itl = self.itl.labels(*labels)
            for a, b in zip(req.chunk_ns, req.chunk_ns[1:], strict=False):
                itl.observe((b - a) / 1e9)
