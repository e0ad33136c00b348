"""The gateway's tallied metrics (gateway/metrics.py) expose exactly what prometheus_client's own metrics would."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from inferstack.gateway.metrics import _LAT_BUCKETS, _TOK_BUCKETS, GatewayMetrics

LABELS = ("m", "pool", "127.0.0.1:1", "tenant")
NAMES = {"gen_ai_server_time_to_first_token_seconds": _LAT_BUCKETS,
         "gen_ai_server_time_per_output_token_seconds": _TOK_BUCKETS,
         "gen_ai_server_request_duration_seconds": _LAT_BUCKETS,
         "inferstack_gateway_inter_token_latency_seconds": _TOK_BUCKETS}


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Every sample but the creation times, keyed by name and labels (NaN as a string: NaN != NaN)."""
    return {(s.name, tuple(sorted(s.labels.items()))): (str(s.value) if s.value != s.value else s.value)
            for fam in registry.collect() for s in fam.samples if not s.name.endswith("_created")}


def reference(values: list[float]) -> CollectorRegistry:
    """prometheus_client's own metrics after the same observations and increments."""
    r = CollectorRegistry()
    for name, buckets in NAMES.items():
        h = Histogram(name, "", ("model", "pool", "endpoint", "tenant"), buckets=buckets, registry=r)
        for v in values:
            h.labels(*LABELS).observe(v)
    c = Counter("inferstack_gateway_requests", "", ("model", "pool", "endpoint", "tenant", "status"), registry=r)
    c.labels(*LABELS, "200").inc(len(values))
    t = Counter("inferstack_gateway_tokens", "", ("model", "pool", "tenant", "type"), registry=r)
    t.labels("m", "pool", "tenant", "input").inc(3 * len(values))
    t.labels("m", "pool", "tenant", "output").inc(5 * len(values))
    d = Counter("inferstack_gateway_routing_decisions", "", ("pool", "profile", "scorer"), registry=r)
    d.labels("pool", "default", "prefix").inc(len(values))
    return r


def tallied(values: list[float]) -> GatewayMetrics:
    m = GatewayMetrics()
    ttft, tpot, e2e, itl = m.latency_children(LABELS)
    for v in values:
        ttft.observe(v)
        tpot.observe(v)
        e2e.observe(v)
        m.request_done(*LABELS, 200)
        m.tokens_used("m", "pool", "tenant", 3, 5)
        m.decision("pool", "default", "prefix")
    itl.observe_many(values)
    return m


def test_tallied_metrics_expose_what_prometheus_client_would():
    rng = random.Random(7)
    values = [rng.expovariate(rng.choice((2.0, 50.0, 0.05))) for _ in range(3000)]
    values += [0.0, 0.001, 0.0025, 120.0, 1e12, float("inf")]  # bucket edges, past the last bound
    ours = {k: v for k, v in samples(tallied(values).registry).items() if k in samples(reference(values))}
    assert ours == samples(reference(values))
    assert len(ours) == len(samples(reference(values))) > 80


def test_a_nan_counts_in_the_sum_and_no_bucket_as_with_prometheus_client():
    values = [0.5, float("nan"), 2.0]
    ref = samples(reference(values))
    ours = samples(tallied(values).registry)
    assert all(ours[k] == v for k, v in ref.items())
    assert ref[("gen_ai_server_request_duration_seconds_sum", tuple(sorted(zip(
        ("model", "pool", "endpoint", "tenant"), LABELS, strict=True))))] == "nan"


def test_every_scrape_sees_every_request_so_far_and_a_scrape_thread_never_loses_one():
    m = GatewayMetrics()
    scraped: list[str] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            scraped.append(generate_latest(m.registry).decode())

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for i in range(20_000):
            m.request_done(*LABELS, 200)
            m.latency_children(LABELS)[2].observe(i * 1e-4)
    finally:
        stop.set()
        t.join()
    assert len(scraped) > 1
    text = generate_latest(m.registry).decode()
    assert 'inferstack_gateway_requests_total{endpoint="127.0.0.1:1",model="m",pool="pool",status="200",' \
           'tenant="tenant"} 20000.0' in text
    assert 'gen_ai_server_request_duration_seconds_count{endpoint="127.0.0.1:1",model="m",pool="pool",' \
           'tenant="tenant"} 20000.0' in text


def test_a_negative_token_count_is_refused_as_by_a_counter():
    with pytest.raises(ValueError, match="non-negative"):
        GatewayMetrics().tokens_used("m", "pool", "tenant", -1, 5)
