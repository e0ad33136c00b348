"""The dashboard's ring buffer: real Prometheus exposition in, windowed chart points out."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inferstack.telemetry.dashboard_state import DashboardHistory

LAT = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Gateway:
    def __init__(self) -> None:
        self.r = CollectorRegistry()
        labels = ("model", "pool", "endpoint", "tenant")
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds", "x", labels, buckets=LAT, registry=self.r)
        self.requests = Counter("inferstack_gateway_requests", "x", (*labels, "status"), registry=self.r)
        self.tokens = Counter("inferstack_gateway_tokens", "x", ("model", "pool", "tenant", "type"), registry=self.r)
        self.shed = Counter("inferstack_gateway_shed", "x", ("pool", "reason"), registry=self.r)

    def text(self) -> str:
        return generate_latest(self.r).decode()


class Engine:
    def __init__(self) -> None:
        self.r = CollectorRegistry()
        self.waiting = Gauge("vllm:num_requests_waiting", "x", ["model_name"], registry=self.r)
        self.running = Gauge("vllm:num_requests_running", "x", ["model_name"], registry=self.r)
        self.kv = Gauge("vllm:kv_cache_usage_perc", "x", ["model_name"], registry=self.r)
        self.q = Counter("vllm:prefix_cache_queries", "x", ["model_name"], registry=self.r)
        self.h = Counter("vllm:prefix_cache_hits", "x", ["model_name"], registry=self.r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "x", ["model_name"], buckets=LAT, registry=self.r)
        self.gen = Counter("vllm:generation_tokens", "x", ["model_name"], registry=self.r)

    def text(self) -> str:
        return generate_latest(self.r).decode()


def state(gw: Gateway | None, engines: dict[str, Engine], healthy: bool = True) -> dict:
    return {"gateway": {"metrics": gw.text()} if gw else None,
            "endpoints": [{"name": n, "url": f"http://127.0.0.1:{9000 + i}", "model": "m",
                           "healthy": healthy, "metrics": e.text()} for i, (n, e) in enumerate(engines.items())]}


def test_gateway_percentiles_rates_and_endpoint_table() -> None:
    gw, e0, e1 = Gateway(), Engine(), Engine()
    hist = DashboardHistory(window_s=10, history_s=60)
    hist.ingest(state(gw, {"e0": e0, "e1": e1}), now=100.0)
    ttft = gw.ttft.labels("m", "p", "e0", "t")
    for _ in range(90):
        ttft.observe(0.03)          # bucket (0.01, 0.05]
    for _ in range(10):
        ttft.observe(0.7)           # bucket (0.5, 1.0]
    gw.requests.labels("m", "p", "e0", "t", "200").inc(100)
    gw.requests.labels("m", "p", "e0", "t", "429").inc(20)
    gw.tokens.labels("m", "p", "t", "output").inc(500)
    gw.shed.labels("p", "queue_full").inc(20)
    e0.kv.labels("m").set(0.25)
    e0.waiting.labels("m").set(3)
    e0.q.labels("m").inc(100)
    e0.h.labels("m").inc(40)
    hist.ingest(state(gw, {"e0": e0, "e1": e1}), now=110.0)

    out = hist.render()
    charts = out["charts"]
    p50 = charts["ttft"]["series"]["p50"][-1][1]
    p99 = charts["ttft"]["series"]["p99"][-1][1]
    assert 0.01 < p50 <= 0.05 and 0.5 < p99 <= 1.0
    assert charts["requests"]["series"]["200"][-1][1] == 10.0       # 100 requests in 10 s
    assert charts["requests"]["series"]["429"][-1][1] == 2.0
    assert charts["throughput"]["series"]["output"][-1][1] == 50.0
    assert charts["routing"]["series"]["shed"][-1][1] == 2.0
    assert charts["kv"]["series"]["e0"][-1][1] == 25.0
    assert charts["queue"]["series"]["e0"][-1][1] == 3.0
    assert charts["prefix_hit"]["series"]["e0"][-1][1] == 40.0
    row = {r["name"]: r for r in out["endpoints"]}["e0"]
    assert row["kv_percent"] == 25.0 and row["waiting"] == 3 and row["prefix_hit_percent"] == 40.0
    assert row["state"] == "ready"


def test_engine_histograms_stand_in_when_the_gateway_has_none() -> None:
    e0, e1 = Engine(), Engine()
    hist = DashboardHistory(window_s=10)
    hist.ingest(state(None, {"e0": e0, "e1": e1}), now=0.0)
    for _ in range(50):
        e0.ttft.labels("m").observe(0.2)
        e1.ttft.labels("m").observe(0.2)
    e0.gen.labels("m").inc(30)
    e1.gen.labels("m").inc(10)
    hist.ingest(state(None, {"e0": e0, "e1": e1}), now=2.0)
    charts = hist.render()["charts"]
    assert 0.1 < charts["ttft"]["series"]["p95"][-1][1] <= 0.25
    assert charts["throughput"]["series"]["output"][-1][1] == 20.0


def test_window_and_history_bounds_and_since_filter() -> None:
    e0 = Engine()
    hist = DashboardHistory(window_s=5, history_s=20)
    for t in range(0, 40):
        e0.gen.labels("m").inc(10)              # 10 tokens per second, steady
        hist.ingest(state(None, {"e0": e0}), now=float(t))
    out = hist.render()
    points = out["charts"]["throughput"]["series"]["output"]
    assert points[0][0] >= 19.0 and points[-1][0] == 39.0       # only the last 20 s are kept
    assert points[-1][1] == 10.0
    newer = hist.render(since=37.0)["charts"]["throughput"]["series"]["output"]
    assert [p[0] for p in newer] == [38.0, 39.0]


def test_unreachable_endpoint_and_bad_text_are_reported_not_raised() -> None:
    hist = DashboardHistory()
    hist.ingest({"gateway": {"metrics": "<html><body>Not Found</body></html>"},
                 "endpoints": [{"name": "e0", "url": "http://x", "healthy": False, "state": "restarting",
                                "metrics": None}]}, now=1.0)
    out = hist.render()
    assert out["errors"] and out["errors"][0].startswith("gateway:")
    assert out["endpoints"][0]["state"] == "restarting" and out["endpoints"][0]["kv_percent"] is None
