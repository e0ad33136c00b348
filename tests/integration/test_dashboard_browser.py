"""The dashboard page in real headless Chromium: loads, draws every chart from live data, no console errors."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.routing import Mount
from tests.support.chromium import CANVAS_PIXELS_JS, Browser

from inferstack.telemetry.dashboard import dashboard_app


class LiveMetrics:
    """Metrics that keep moving, with the gateway's and engines' real names, observed by a thread."""

    def __init__(self) -> None:
        self.gw = CollectorRegistry()
        lab = ("model", "pool", "endpoint", "tenant")
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds", "", lab, registry=self.gw)
        self.tpot = Histogram("gen_ai_server_time_per_output_token_seconds", "", lab, registry=self.gw)
        self.itl = Histogram("inferstack_gateway_inter_token_latency_seconds", "", lab, registry=self.gw)
        self.req = Counter("inferstack_gateway_requests", "", (*lab, "status"), registry=self.gw)
        self.tok = Counter("inferstack_gateway_tokens", "", ("model", "pool", "tenant", "type"), registry=self.gw)
        self.dec = Counter("inferstack_gateway_routing_decisions", "", ("pool", "profile", "scorer"),
                           registry=self.gw)
        self.shed = Counter("inferstack_gateway_shed", "", ("pool", "reason"), registry=self.gw)
        self.engines = {}
        for name in ("engine-0", "engine-1"):
            r = CollectorRegistry()
            self.engines[name] = (r, Gauge("vllm:num_requests_waiting", "", ["model_name"], registry=r),
                                  Gauge("vllm:kv_cache_usage_perc", "", ["model_name"], registry=r),
                                  Counter("vllm:prefix_cache_queries", "", ["model_name"], registry=r),
                                  Counter("vllm:prefix_cache_hits", "", ["model_name"], registry=r))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = random.Random(0)
        while not self.stop.is_set():
            ep = rng.choice(list(self.engines))
            labels = ("smollm2-135m", "local", ep, "default")
            self.ttft.labels(*labels).observe(rng.uniform(0.05, 0.6))
            self.tpot.labels(*labels).observe(rng.uniform(0.01, 0.05))
            self.itl.labels(*labels).observe(rng.uniform(0.01, 0.06))
            self.req.labels(*labels, rng.choice(["200", "200", "200", "429"])).inc()
            self.tok.labels("smollm2-135m", "local", "default", "output").inc(rng.randint(5, 30))
            self.tok.labels("smollm2-135m", "local", "default", "input").inc(rng.randint(20, 60))
            self.dec.labels("local", "default", rng.choice(["prefix", "queue", "kv"])).inc()
            if rng.random() < 0.1:
                self.shed.labels("local", "queue_full").inc()
            for _r, waiting, kv, q, h in self.engines.values():
                waiting.labels("smollm2-135m").set(rng.randint(0, 4))
                kv.labels("smollm2-135m").set(rng.uniform(0.1, 0.6))
                q.labels("smollm2-135m").inc(64)
                h.labels("smollm2-135m").inc(rng.randint(0, 64))
            time.sleep(0.05)

    async def provider(self) -> dict:
        return {"gateway": {"metrics": generate_latest(self.gw).decode()},
                "endpoints": [{"name": n, "url": f"http://127.0.0.1:{40000 + i}", "model": "smollm2-135m",
                               "healthy": True, "state": "ready", "restarts": 0,
                               "metrics": generate_latest(e[0]).decode()}
                              for i, (n, e) in enumerate(self.engines.items())]}


@pytest.fixture
def dashboard_url() -> Iterator[str]:
    metrics = LiveMetrics()
    app = Starlette(routes=[Mount("/dashboard", app=dashboard_app(metrics.provider))])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/dashboard/"
    server.should_exit = True
    metrics.stop.set()
    thread.join(10)


@pytest.mark.slow
def test_dashboard_draws_live_charts_in_chromium(dashboard_url: str, tmp_path: Path) -> None:
    browser = Browser()
    try:
        browser.open(dashboard_url)
        browser.pump(5.0)
        state = browser.evaluate("window.inferstackDashboard")
        assert state["updates"] >= 3, state          # polled about once a second
        pixels = browser.evaluate(CANVAS_PIXELS_JS)
        assert len(pixels) == 9, pixels
        drawn = {k: v for k, v in pixels.items() if v["lines"] > 50}
        assert set(drawn) == set(pixels), pixels     # every chart has coloured data lines
        rows = browser.evaluate("document.querySelectorAll('#endpoints tbody tr').length")
        assert rows == 2
        assert browser.evaluate("document.getElementById('status').className") == "status live"
        shots = Path(os.environ.get("INFERSTACK_ARTIFACTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        browser.screenshot(shots / "dashboard.png")   # look at it: INFERSTACK_ARTIFACTS=DIR pytest ...
        assert browser.console_errors == []
    finally:
        browser.close()
