"""Endpoint picker latency: Envoy + `inferstack epp serve` vs Envoy with a static cluster vs our HTTP
gateway vs going direct, same run, same instant fake engines, at a fixed request rate.

Client side: end-to-end latency of each target at ``--rate`` req/s (open loop, evenly spaced) for
``--duration`` s. Picker side: `inferstack_epp_decision_seconds` (request end-of-stream in ->
routing response out, excluding the body's transfer), p50/p99 by histogram interpolation. CPU ms per
request of the target's own processes (Envoy and the picker; the gateway), robust to a busy machine.

    python benchmarks/epp_latency.py [--rate 500] [--duration 10] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import orjson
from gateway_common import (
    ROOT,
    median,
    pct,
    start_envoy_epp,
    start_fake_engines,
    start_inferstack_gateway,
)
from gateway_overhead import cpu_seconds

from inferstack.epp.envoy_config import bootstrap
from inferstack.telemetry.promtext import bucket_increase, histogram_quantile, parse

sys.path.insert(0, str(ROOT / "tests"))
from support.envoy_procs import start_envoy

MODEL = "bench-model"
DECISION = "inferstack_epp_decision_seconds"


async def fixed_rate(url: str, body: bytes, rate: float, duration: float) -> tuple[list[float], int]:
    """Send at ``rate`` req/s regardless of responses; returns latencies of 200s and the error count."""
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(
        headers={"content-type": "application/json"}, connector=aiohttp.TCPConnector(limit=0)
    ) as s:

        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                async with s.post(url, data=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                lat.append(time.perf_counter() - t)
            else:
                errors += 1

        tasks = []
        start = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return lat, errors


def envoy_config(epp: str, workers: list[str], ext_proc: bool = True) -> dict:
    eps = [(w.removeprefix("http://").rsplit(":", 1)[0], int(w.rsplit(":", 1)[1])) for w in workers]
    host, port = epp.rsplit(":", 1)
    cfg = bootstrap(("127.0.0.1", 0), ("127.0.0.1", 0), (host, int(port)), cluster="override_host",
                    endpoints=eps)
    if not ext_proc:  # the static-cluster peer: same Envoy, no ext_proc (round robin)
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    engines = start_fake_engines(2, "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "8")
    workers = [e.url for e in engines]
    body = orjson.dumps(
        {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 200}]}
    )
    procs: list = []
    try:
        pool = {"pools": {"bench": {"endpoints": workers, "models": [MODEL]}}}
        via_epp = start_envoy_epp(pool, cluster="override_host")
        procs.append(via_epp)
        epp_info = via_epp.extra["epp"]  # its ready file: grpc, health and metrics addresses
        static = start_envoy(envoy_config(epp_info["grpc"], workers, ext_proc=False))
        gw = start_inferstack_gateway(pool)
        procs += [static, gw]
        targets = [
            ("direct (1 engine)", workers[0], []),
            ("envoy static cluster", static.url, [static.proc.pid]),
            ("envoy + inferstack epp", via_epp.url, [p.proc.pid for p in via_epp.parts]),
            ("inferstack gateway (HTTP)", gw.url, [gw.proc.pid]),
        ]
        rows = []
        for name, base, pids in targets:
            url = base + "/v1/chat/completions"
            asyncio.run(fixed_rate(url, body, min(args.rate, 100.0), 1.0))  # warm-up
            before = httpx.get(epp_info["metrics"] + "/metrics").text if "epp" in name else ""
            cpu0 = sum(cpu_seconds(p) for p in pids)
            lat, errors = asyncio.run(fixed_rate(url, body, args.rate, args.duration))
            row = {
                "target": name,
                "rate": args.rate,
                "ok": len(lat),
                "errors": errors,
                "p50_ms": median(lat) * 1e3,
                "p99_ms": pct(lat, 0.99) * 1e3,
            }
            if pids:
                row["cpu_ms_per_req"] = (sum(cpu_seconds(p) for p in pids) - cpu0) / (len(lat) + errors) * 1e3
            if before:
                after = httpx.get(epp_info["metrics"] + "/metrics").text
                buckets = bucket_increase(parse(before, 0.0), parse(after, 1.0), DECISION)
                row["decision_p50_ms"] = (histogram_quantile(0.5, buckets) or 0.0) * 1e3
                row["decision_p99_ms"] = (histogram_quantile(0.99, buckets) or 0.0) * 1e3
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for p in procs + engines:
            p.stop()
    cols = [
        "target",
        "rate",
        "ok",
        "errors",
        "p50_ms",
        "p99_ms",
        "cpu_ms_per_req",
        "decision_p50_ms",
        "decision_p99_ms",
    ]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols)
            + " |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
