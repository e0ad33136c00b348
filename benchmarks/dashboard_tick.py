"""Cost of one dashboard tick (ingest every target's /metrics text + render the JSON) vs parsing alone.

Exposition comes from the real metric definitions: `EngineMetrics` (vLLM names and buckets) per
endpoint and `GatewayMetrics` with one label set per endpoint, all histograms observed. The peer, in
the same run, is prometheus_client's text parser over the same texts: the floor any scraper pays.

    PYTHONPATH=src python benchmarks/dashboard_tick.py [--ticks 120]
"""

from __future__ import annotations

import argparse
import random
import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferstack.engine.stats import EngineStats
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.telemetry.dashboard_state import DashboardHistory
from inferstack.telemetry.engine_metrics import EngineMetrics


def exposition(n_endpoints: int, rng: random.Random) -> tuple[str, list[str]]:
    gw = GatewayMetrics()
    engines = []
    for i in range(n_endpoints):
        em = EngineMetrics()
        stats = EngineStats(num_running=rng.randint(0, 8), num_waiting=rng.randint(0, 4), kv_cache_usage=0.3,
                            num_kv_blocks=4096, prompt_tokens=10_000, generation_tokens=5_000,
                            prefix_cache_queries=8_000, prefix_cache_hits=3_000,
                            request_success={"stop": 90, "length": 10})
        em.bind("smollm2-135m", lambda s=stats: s)
        obs = em.observer()
        for _ in range(20):
            t0 = time.time()
            obs.on_output(0, 5, {"arrival": t0 - 0.5, "scheduled": t0 - 0.4, "first_token": t0 - 0.3,
                                 "finished": t0, "now": t0}, "stop")
        engines.append(generate_latest(em.registry).decode())
        ttft, tpot, e2e, itl = gw.latency_children(("smollm2-135m", "default", f"127.0.0.1:{4000 + i}", "default"))
        for _ in range(20):
            ttft.observe(rng.uniform(0.05, 1.0))
            tpot.observe(rng.uniform(0.01, 0.1))
            e2e.observe(rng.uniform(0.5, 3.0))
            itl.observe(rng.uniform(0.01, 0.1))
        gw.requests.labels("smollm2-135m", "default", f"127.0.0.1:{4000 + i}", "default", "200").inc(20)
    gw.tokens.labels("smollm2-135m", "default", "default", "output").inc(100)
    gw.decisions.labels("default", "default", "prefix").inc(20)
    return generate_latest(gw.registry).decode(), engines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticks", type=int, default=120)
    args = ap.parse_args()
    rng = random.Random(0)
    print(f"{'endpoints':>9} {'bytes/tick':>10} {'parse only ms':>13} {'full tick ms':>12} {'ratio':>6} "
          f"{'CPU at 1 Hz':>11}")
    for n in (2, 8, 32):
        gw_text, engine_texts = exposition(n, rng)
        texts = [gw_text, *engine_texts]
        state = {"gateway": {"metrics": gw_text},
                 "endpoints": [{"name": f"engine-{i}", "url": f"http://127.0.0.1:{4000 + i}", "healthy": True,
                                "metrics": t} for i, t in enumerate(engine_texts)]}
        t0 = time.perf_counter()
        for _ in range(args.ticks):
            for t in texts:
                for fam in text_string_to_metric_families(t):
                    for _s in fam.samples:
                        pass
        parse_ms = (time.perf_counter() - t0) * 1000 / args.ticks
        hist = DashboardHistory(window_s=10, history_s=300)
        t0 = time.perf_counter()
        for k in range(args.ticks):
            hist.ingest(state, now=float(k))
            hist.render(since=float(k) - 1)
        tick_ms = (time.perf_counter() - t0) * 1000 / args.ticks
        size = sum(len(t) for t in texts)
        print(f"{n:>9} {size:>10} {parse_ms:>13.2f} {tick_ms:>12.2f} {tick_ms / parse_ms:>6.2f} {tick_ms / 10:>10.2f}%")


if __name__ == "__main__":
    main()
