"""Client capacity: the highest open-loop rate one core sends without drift, against an instant server.

The bench client runs in this process pinned to one core; the scripted instant server
(`inferstack.bench.testserver`, non-streaming, zero latency) runs pinned to the other core. For each
rate (constant arrivals) we report the send rate, completion rate, schedule lag and the client's CPU
time per request; a rate is *held* when send and completion rates are within 2% of the target.
Peer in the same run: the same schedule sent with aiohttp (shared pool, prebuilt body).

Run: .venv/bin/python benchmarks/bench_client_capacity.py [--rates 1000,2000,3000,4000] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import aiohttp
import orjson
import uvloop

from inferstack.bench.client import ClientOptions
from inferstack.bench.runner import LoadSpec, RunConfig, execute
from inferstack.bench.workloads import parse_workload


def start_server(core: int | None) -> tuple[subprocess.Popen, str]:
    ready = Path(tempfile.mkdtemp()) / "ready.json"
    cmd = [sys.executable, "-m", "inferstack.bench.testserver", "--port", "0", "--ready-file", str(ready)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None)
    while not (ready.exists() and ready.stat().st_size):
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["urls"][0]


def ours(url: str, rate: float, duration: float) -> dict[str, float]:
    cfg = RunConfig(targets=[url], model="m", workload=parse_workload("synthetic:input=32,output=4"),
                    load=LoadSpec(rate=rate, arrival="constant"), duration_s=duration,
                    client=ClientOptions(stream=False), progress=False, scrape_interval_s=5.0)
    cpu0 = time.process_time()
    res = uvloop.run(execute(cfg))
    cpu = time.process_time() - cpu0
    s = res.summary
    return {"send_rate": s["load"]["send_rate"], "done_rate": s["throughput"]["requests_per_s"],
            "lag_p50_ms": s["load"]["schedule_lag_s"]["p50"] * 1e3,
            "lag_p99_ms": s["load"]["schedule_lag_s"]["p99"] * 1e3,
            "failed": s["requests"]["failed"], "cpu_us_per_request": cpu / max(1, s["requests"]["sent"]) * 1e6}


async def _aiohttp_run(url: str, rate: float, duration: float) -> dict[str, float]:
    body = orjson.dumps({"model": "m", "prompt": "hello " * 32, "max_tokens": 4})
    n = int(rate * duration)
    lags: list[float] = []
    failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one(t: float) -> None:
            nonlocal failed
            lags.append(time.perf_counter() - t)
            try:
                async with s.post(url + "/v1/completions", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

        cpu0 = time.process_time()
        t0 = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            t = t0 + i / rate
            d = t - time.perf_counter()
            if d > 0:
                await asyncio.sleep(d)
            tasks.append(asyncio.create_task(one(t)))
        sent = time.perf_counter()
        await asyncio.gather(*tasks)
        end = time.perf_counter()
        cpu = time.process_time() - cpu0
    lags.sort()
    return {"send_rate": (n - 1) / (sent - t0), "done_rate": n / (end - t0), "lag_p50_ms": lags[n // 2] * 1e3,
            "lag_p99_ms": lags[int(n * 0.99)] * 1e3, "failed": failed, "cpu_us_per_request": cpu / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1000,2000,3000,4000")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    client_core, server_core = cores[0], (cores[1] if len(cores) > 1 else None)
    proc, url = start_server(server_core)
    os.sched_setaffinity(0, {client_core})
    rows = []
    try:
        for rate in (float(r) for r in args.rates.split(",")):
            for name, fn in (("inferstack", ours), ("aiohttp", lambda u, r, d: uvloop.run(_aiohttp_run(u, r, d)))):
                if name == "aiohttp" and not args.peer:
                    continue
                m = fn(url, rate, args.duration)
                held = m["send_rate"] >= 0.98 * rate and m["done_rate"] >= 0.98 * rate and not m["failed"]
                rows.append({"client": name, "rate": rate, **m, "held": held})
                print(f"{name:10s} target {rate:6.0f}/s: sent {m['send_rate']:7.1f}/s done {m['done_rate']:7.1f}/s "
                      f"lag p50 {m['lag_p50_ms']:6.1f} ms p99 {m['lag_p99_ms']:7.1f} ms "
                      f"cpu {m['cpu_us_per_request']:5.0f} µs/req {'HELD' if held else 'drift'}", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    best = {c: max([r["rate"] for r in rows if r["client"] == c and r["held"]], default=None)
            for c in {r["client"] for r in rows}}
    print("highest rate held:", best, "| load average:", os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "best": best, "loadavg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
