"""`inferstack observe` against ground truth, and what it costs.

1. Accuracy: `inferstack bench` (a separate process) drives an emulated engine at constant arrivals while
   observe watches the engine's port; each request's TTFT, mean ITL and E2E from eBPF are paired (by
   arrival order) with the client's own and the absolute errors reported (target: TTFT median ≤ 2 ms,
   p99 ≤ 5 ms); and eBPF's TTFT/ITL histograms against the observed server's own (its /metrics before
   and after the run: counts, means, cumulative counts at the bucket bounds both share;
   inferstack.observe.crosscheck).
2. Cost: output tokens/s at 16 concurrent streams, runs without (A) and with (B) observe interleaved
   A/B/A/B... (--pairs of them; target: ≤ 3 % lower with observe): the median cost over the pairs and its
   spread (min..max, and each pair's); kernel time per probe run (kernel.bpf_stats_enabled on during the
   observed runs, restored after) and bpftrace's and the decoder's CPU per captured syscall segment.
   `--cost-only` runs just this, for a quiet machine.
3. The same accuracy run through our gateway (`inferstack gateway serve`) and through a server we did not
   write, `sglang-router` (Rust, PyPI; installed into its own venv by benchmarks/gateway_common.py), in
   front of the engine, observing the gateway's / router's port.

Needs root and bpftrace. Run: .venv/bin/python benchmarks/observe_accuracy.py [--pairs 3] [--no-router]
[--no-gateway] (--pairs 0 skips the cost runs) [--cost-only --pairs 8 --cost-duration 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from gateway_common import Proc, env, start_emulated_fleet, start_inferstack_gateway, start_sglang_router
from prometheus_client import generate_latest

from inferstack.observe.crosscheck import ENGINE_PAIRS, GATEWAY_PAIRS, compare, samples
from inferstack.observe.preflight import unavailable_reason
from inferstack.observe.runner import CaptureOptions
from inferstack.observe.session import Session, save
from inferstack.telemetry.promtext import Scrape, parse

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def bench(url: str, out: Path, *load: str, workload: str) -> dict:
    cmd = [sys.executable, "-m", "inferstack", "bench", "run", "--target", url, "--model", MODEL, "--workload",
           workload, *load, "--out", str(out), "--no-progress", "--no-plots", "--scrape-interval", "5"]
    subprocess.run(cmd, env=env(), check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def observed(url: str, out: Path, fn) -> tuple[object, dict]:   # type: ignore[no-untyped-def]
    """Run fn() while observe watches url's port; return fn's result and the observed results.json
    (with "ebpf_metrics": observe's scrape and "ebpf_samples": its per-request TTFT / gap values)."""
    # attaching 25 probes took 36-45 s at load ~20 on the shared 2-core machine: more than the default 60 s allows
    session = Session(None, int(url.rsplit(":", 1)[1]), CaptureOptions(start_timeout_s=240), log=print)
    session.start()
    try:
        value = fn()
    finally:
        time.sleep(0.3)                 # the last responses are released after the reorder window
        session.stop()
        res = session.finish()
    save(res, out, plots=False, capture_bodies=False)
    obs = json.loads((out / "results.json").read_text())
    obs["ebpf_metrics"] = generate_latest(session.metrics.registry).decode()
    obs["ebpf_samples"] = samples(res.requests)
    return value, obs


def _scrape(url: str) -> Scrape:
    return parse(httpx.get(f"{url}/metrics", timeout=10).text, time.time())


def _stats(err_ms: np.ndarray) -> dict:
    a = np.abs(err_ms)
    return {"n": int(a.size), "median_abs_ms": round(float(np.median(a)), 3),
            "p99_abs_ms": round(float(np.percentile(a, 99)), 3), "max_abs_ms": round(float(a.max()), 3),
            "median_signed_ms": round(float(np.median(err_ms)), 3)}


def accuracy(url: str, tmp: Path, name: str, rate: float, duration: float, pairs=None) -> dict:  # type: ignore[no-untyped-def]
    """Client vs eBPF per request; with ``pairs`` (crosscheck's (what, server, eBPF) histogram names),
    also the server's own histograms vs eBPF's."""
    before = _scrape(url) if pairs else None
    client, obs = observed(url, tmp / f"{name}-observed", lambda: bench(
        url, tmp / f"{name}-client", "--rate", str(rate), "--arrival", "constant", "--duration", str(duration),
        workload="synthetic:input=64,output=24"))
    histograms = {} if before is None else {c.what: c.to_dict() for c in compare(
        before, _scrape(url), parse(obs["ebpf_metrics"], 0.0), obs["ebpf_samples"], pairs)}
    c = sorted(client["requests"], key=lambda r: r["sent_s"])  # type: ignore[index]
    e = sorted(obs["requests"], key=lambda r: r["sent_s"])
    if len(c) != len(e):
        return {"error": f"client saw {len(c)} requests, eBPF {len(e)}"}
    pairs = [(a, b) for a, b in zip(c, e, strict=True) if a["ttft_s"] is not None and b["ttft_s"] is not None]

    def err(key: str) -> np.ndarray:
        return np.asarray([(a[key] - b[key]) * 1e3 for a, b in pairs if a[key] is not None and b[key] is not None])

    return {"requests": len(c), "paired": len(pairs), "chunks_equal": all(a["chunks"] == b["chunks"] for a, b in pairs),
            "ttft": _stats(err("ttft_s")), "itl_mean": _stats(err("itl_mean_s")), "e2e": _stats(err("e2e_s")),
            "server_histograms_vs_ebpf": histograms, "capture": obs["config"]["observe"]}


def cost(url: str, tmp: Path, pairs: int, duration: float) -> dict:
    load = ("--concurrency", "16", "--duration", str(duration))
    work = "synthetic:input=128,output=64"
    without, with_obs, capture = [], [], []
    stats_before = BPF_STATS.read_text().strip() if BPF_STATS.exists() else None
    try:
        for i in range(pairs):
            r = bench(url, tmp / f"cost-{i}-plain", *load, workload=work)
            without.append(r["summary"]["throughput"]["output_tokens_per_s"])
            if stats_before is not None:
                BPF_STATS.write_text("1")
            r, obs = observed(url, tmp / f"cost-{i}-observed", lambda i=i: bench(
                url, tmp / f"cost-{i}-client", *load, workload=work))
            if stats_before is not None:
                BPF_STATS.write_text(stats_before)
            with_obs.append(r["summary"]["throughput"]["output_tokens_per_s"])  # type: ignore[index]
            capture.append(obs["config"]["observe"])
    finally:
        if stats_before is not None:
            BPF_STATS.write_text(stats_before)
    cost_pct = [round((1 - w / p) * 100, 2) for w, p in zip(with_obs, without, strict=True)]
    return {"output_tok_s_without": without, "output_tok_s_with": with_obs,
            "throughput_cost_pct_per_pair": cost_pct,
            "throughput_cost_pct_median": round(float(np.median(cost_pct)), 2),
            "throughput_cost_pct_spread": [min(cost_pct), max(cost_pct)],
            "throughput_without_spread_pct": round((max(without) - min(without)) / float(np.median(without)) * 100, 2),
            "kernel_ns_per_probe": [c["kernel_ns_per_probe"] for c in capture],
            "bpftrace_cpu_us_per_segment": [c["bpftrace_cpu_us_per_segment"] for c in capture],
            "decoder_cpu_us_per_segment": [c["decoder_cpu_us_per_segment"] for c in capture],
            "segments_per_s": [c["segments"] / c["duration_s"] for c in capture],
            "lost_events": [c["lost_events"] for c in capture]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="h100:llama-3-8b")
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--accuracy-duration", type=float, default=5.0)
    p.add_argument("--cost-duration", type=float, default=10.0)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--no-router", action="store_true")
    p.add_argument("--no-gateway", action="store_true")
    p.add_argument("--cost-only", action="store_true", help="only the A/B throughput-cost runs")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    tmp = a.out or Path(tempfile.mkdtemp(prefix="observe-accuracy-"))
    tmp.mkdir(parents=True, exist_ok=True)
    engine = start_emulated_fleet(a.profile, 1)
    fronts: list[Proc] = []
    report: dict = {"profile": a.profile}
    try:
        if not a.cost_only:
            report["engine"] = accuracy(engine.url, tmp, "engine", a.rate, a.accuracy_duration, ENGINE_PAIRS)
            print(json.dumps({"engine": report["engine"]}, indent=1), flush=True)
        if a.pairs:
            report["cost"] = cost(engine.url, tmp, a.pairs, a.cost_duration)
            print(json.dumps({"cost": report["cost"]}, indent=1), flush=True)
        if not a.no_gateway and not a.cost_only:
            fronts.append(start_inferstack_gateway({"pools": {"bench": {"endpoints": [engine.url],
                                                                         "models": [MODEL]}}}))
            report["gateway"] = accuracy(fronts[-1].url, tmp, "gateway", a.rate, a.accuracy_duration, GATEWAY_PAIRS)
            print(json.dumps({"gateway": report["gateway"]}, indent=1), flush=True)
        if not a.no_router and not a.cost_only:
            fronts.append(start_sglang_router([engine.url], "round_robin"))
            report["sglang_router"] = accuracy(fronts[-1].url, tmp, "router", a.rate, a.accuracy_duration)
            print(json.dumps({"sglang_router": report["sglang_router"]}, indent=1), flush=True)
    finally:
        for front in fronts:
            front.stop()
        engine.stop()
    (tmp / "observe_accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {tmp / 'observe_accuracy.json'}")


if __name__ == "__main__":
    main()
