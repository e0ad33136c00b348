"""Cost of parsing one engine `/metrics` scrape: what the gateway pays per endpoint per scrape.

Starts an emulated engine (real HTTP server and metrics), runs a few requests so every family has
samples, fetches `/metrics` once, then times on that text:
- the gateway's parse (`gateway.datalayer.parse_engine_metrics`: promtext restricted to its names),
- the bench scraper's parse (`bench.scrape.parse_metrics`),
- promtext's full parse (every sample, as the dashboard without a filter),
- prometheus_client's reference parser (the peer).

Run: PYTHONPATH=src python benchmarks/promtext_parse.py [--iters 3000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prometheus_client.parser import text_string_to_metric_families

from inferstack.bench.scrape import parse_metrics
from inferstack.gateway.datalayer import parse_engine_metrics
from inferstack.telemetry.promtext import parse
from support.procs import start_inferstack


def engine_metrics_text() -> str:
    srv = start_inferstack(["engine", "serve", "--emulate", "cpu:smollm2-135m"])
    try:
        model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        for i in range(4):
            httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": f"request {i}", "max_tokens": 4})
        return httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()


def per_call_us(fn: Callable[[str], object], text: str, iters: int) -> float:
    fn(text)
    best = float("inf")
    for _ in range(3):     # best of three: the machine is shared
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(text)
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3000)
    args = ap.parse_args()
    text = engine_metrics_text()
    rows = [
        ("gateway: parse_engine_metrics (promtext, 9 names)", parse_engine_metrics),
        ("bench: parse_metrics (promtext, 13 names)", parse_metrics),
        ("promtext.parse, every sample", lambda t: parse(t, 0.0)),
        ("prometheus_client text_string_to_metric_families", lambda t: list(text_string_to_metric_families(t))),
    ]
    print(f"engine /metrics: {len(text.splitlines())} lines, {len(text)} bytes")
    print("| parser | µs per scrape |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {per_call_us(fn, text, args.iters):.0f} |")


if __name__ == "__main__":
    main()
