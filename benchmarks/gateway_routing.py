"""Routing quality: a multi-tenant shared-prefix workload over 4 engines with prefix caches, Poisson
arrival rates swept towards saturation; prefix hit rate, TTFT p50/p90 and throughput per router.

Routers: inferstack `default` and `gie` presets, round-robin, and (with --peers sglang)
sglang-router cache_aware and round_robin, all over the same backends: fake OpenAI engines with an
LRU prefix cache of prompt heads (a hit skips the prefill of all but the last 100 tokens), a prefill
cost per uncached token, a decode time per token and a fixed number of parallel slots (so load
queues). Groups (system prompts) are drawn uniformly or by Zipf popularity (`--popularity zipf:1.1`).
inferstack runs with the user's defaults (flow control on) unless `--flow-control off|both`.
Rows of inferstack routers also say which scorer decided (`decided_by`), each endpoint's distinct groups and
requests (`placement`), and the misses by cause (`misses`: the fake engines' prefix LRUs replayed over the
requests in send order, endpoint from the gateway's served header; see `miss_causes`).

    python benchmarks/gateway_routing.py [--rates 10,20,30,40] [--duration 12] [--peers sglang]
    # the held-out load: 32 tenants' prompts with Zipf(1.1) popularity at 60 req/s for 40 s
    python benchmarks/gateway_routing.py --groups 32 --tenants 32 --popularity zipf:1.1 --rates 60 \
        --duration 40 --routers default --flow-control both --peers sglang
    # flow control on vs off, paired: 3 ABBA pairs over the same arrivals, CI on the p90 ratio (onoff_pairs.py)
    python benchmarks/gateway_routing.py --groups 32 --tenants 32 --popularity zipf:1.1 --rates 60 \
        --duration 40 --routers default --repeats 3 --warmup-s 10 --engine-args "..."
Rows of inferstack routers also say what flow control did (`flow`: requests queued, their summed wait, refusals).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from gateway_common import (
    median,
    pct,
    start_emulated_fleet,
    start_envoy_epp,
    start_fake_engines,
    start_inferstack_gateway,
    start_sglang_router,
)
from onoff_pairs import paired_runs

from inferstack.telemetry import promtext

MODEL = "bench-model"
_CONTENT = re.compile(rb'"content":\s*"[^"]')  # a non-empty content delta (not the role-only first chunk)
SERVED = "x-gateway-destination-endpoint-served"
ENGINE_ARGS = ["--ttft-ms", "5", "--prefill-us-per-token", "250", "--itl-ms", "20", "--tokens", "16",
               "--max-running", "4", "--cache-entries", "6"]


def workload(groups: int, tenants: int, system_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """(tenant key, system prompt) per group: groups are split evenly over tenants."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]
    out = []
    for g in range(groups):
        text = f"group {g}: " + " ".join(rng.choice(words) for _ in range(system_tokens * 4 // 6))
        out.append((f"sk-tenant-{g % tenants}", text))
    return out


async def one(session: aiohttp.ClientSession, url: str, key: str, system: str, q: int, out: list,
              trace: list) -> None:
    """One streamed request; ``trace`` gets (send time, group head, endpoint that served it or "", q) and
    ``out`` ("ok", TTFT, latency, q) or ("error", status, q)."""
    body = {"model": MODEL, "stream": True, "max_tokens": 16, "ignore_eos": True,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {q} " * 40}]}
    t0 = time.perf_counter()
    ttft = None
    async with session.post(url, json=body, headers={"authorization": f"Bearer {key}"}) as r:
        trace.append((t0, system[:16], r.headers.get(SERVED, ""), q))
        if r.status != 200:
            out.append(("error", r.status, q))
            return
        async for chunk in r.content.iter_any():
            if ttft is None and _CONTENT.search(chunk):
                ttft = time.perf_counter() - t0
    out.append(("ok", ttft if ttft is not None else time.perf_counter() - t0, time.perf_counter() - t0, q))


def miss_causes(trace: list[tuple[float, str, str, int]], cache_entries: int) -> dict[str, int]:
    """Replay the engines' prefix LRUs (``cache_entries`` prompt heads each) over the requests in send order
    (endpoint from the gateway's served header) and name each miss: ``cold`` (the group's first request),
    ``spread`` (another engine held the group: the router sent it elsewhere), ``evicted`` (this engine had
    held it and dropped it for other groups; none held it), ``moved`` (held nowhere, last on another engine)."""
    lrus: dict[str, OrderedDict[str, None]] = {}
    last: dict[str, str] = {}
    out = {"hit": 0, "cold": 0, "spread": 0, "evicted": 0, "moved": 0}
    for _, group, ep, _ in sorted(trace):
        if not ep:
            continue
        lru = lrus.setdefault(ep, OrderedDict())
        if group in lru:
            out["hit"] += 1
        elif group not in last:
            out["cold"] += 1
        elif any(group in other for e, other in lrus.items() if e != ep):
            out["spread"] += 1
        else:
            out["evicted" if last[group] == ep else "moved"] += 1
        last[group] = ep
        lru[group] = None
        lru.move_to_end(group)
        while len(lru) > cache_entries:
            lru.popitem(last=False)
    return out


def popularity(spec: str, n: int) -> list[float]:
    """Weights of n groups: `uniform`, or `zipf:S` (weight of the k-th most popular ∝ 1/k^S)."""
    kind, _, param = spec.partition(":")
    if kind == "uniform":
        return [1.0] * n
    if kind == "zipf":
        return [1.0 / (k + 1) ** float(param or 1.0) for k in range(n)]
    raise SystemExit(f"--popularity: expected uniform or zipf:S, got {spec!r}")


async def run_rate(url: str, groups: list[tuple[str, str]], rate: float, duration: float, seed: int,
                   weights: list[float]) -> dict:
    rng = random.Random(seed)
    out: list = []
    trace: list = []
    tasks = []
    sent_s: dict[int, float] = {}  # scheduled send time per request: the same in every run with this seed
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as s:
        start = time.perf_counter()
        t = 0.0
        q = 0
        while t < duration:
            t += rng.expovariate(rate)
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key, system = rng.choices(groups, weights)[0]
            sent_s[q] = t
            tasks.append(asyncio.create_task(one(s, url, key, system, q, out, trace)))
            q += 1
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ok = [o for o in out if o[0] == "ok"]
    ttfts = [o[1] for o in ok]
    return {"rate": rate, "sent": len(out), "ok": len(ok), "req_per_s": len(ok) / elapsed,
            "ttft_p50_s": median(ttfts), "ttft_p90_s": pct(ttfts, 0.9), "ttft_p99_s": pct(ttfts, 0.99),
            "trace": trace, "ttft_by_q": {o[3]: o[1] for o in ok}, "sent_s_by_q": sent_s}


def engine_hits(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in urls:
        for line in urllib.request.urlopen(u + "/metrics").read().decode().splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def decided_by(gateway_url: str) -> dict[str, int]:
    """The gateway's routing decisions by the scorer that decided (its largest weighted margin): which
    term moved requests where they went (a hit rate below a peer's shows here as non-prefix decisions)."""
    text = urllib.request.urlopen(gateway_url + "/metrics").read().decode()
    picks = promtext.parse(text, 0.0).select("inferstack_gateway_routing_decisions_total")
    out: dict[str, int] = {}
    for labels, n in picks.items():
        scorer = dict(labels).get("scorer", "?")
        out[scorer] = out.get(scorer, 0) + int(n)
    return out


def flow_stats(gateway_url: str) -> dict[str, float]:
    """What flow control did during the run, from the gateway's /metrics: requests that waited in its queue
    (`queued`), their summed wait, the upper bound of the longest (the smallest histogram bucket holding
    them all; 0 when none waited), requests it refused (`shed`: shed, queue full or timed out), and requests
    routed to an endpoint without room that waited for it (`held`, `held_wait_sum_s`)."""
    scrape = promtext.parse(urllib.request.urlopen(gateway_url + "/metrics").read().decode(), 0.0)
    queued = sum(scrape.select("inferstack_gateway_queue_wait_seconds_count").values())
    buckets: dict[float, float] = {}
    for labels, n in scrape.select("inferstack_gateway_queue_wait_seconds_bucket").items():
        le = float(dict(labels)["le"])
        buckets[le] = buckets.get(le, 0.0) + n
    longest = min((le for le, n in buckets.items() if n >= queued), default=0.0) if queued else 0.0
    return {"queued": int(queued), "queue_wait_sum_s": sum(scrape.select("inferstack_gateway_queue_wait_seconds_sum")
                                                           .values()),
            "queue_wait_max_le_s": longest, "shed": int(sum(scrape.select("inferstack_gateway_shed_total").values())),
            "held": int(sum(scrape.select("inferstack_gateway_endpoint_wait_seconds_count").values())),
            "held_wait_sum_s": sum(scrape.select("inferstack_gateway_endpoint_wait_seconds_sum").values())}


def placement(trace: list[tuple[float, str, str, int]]) -> list[tuple[int, int]]:
    """Per endpoint (busiest first): the distinct groups it served, and its requests."""
    groups: dict[str, set[str]] = {}
    served: dict[str, int] = {}
    for _, group, ep, _ in trace:
        if ep:
            groups.setdefault(ep, set()).add(group)
            served[ep] = served.get(ep, 0) + 1
    return sorted(((len(groups[e]), served[e]) for e in served), key=lambda p: -p[1])


def _cache_entries(engine_args: str) -> int:
    """The fake engines' `--cache-entries` (their default when not given)."""
    words = engine_args.split()
    return int(words[words.index("--cache-entries") + 1]) if "--cache-entries" in words else 1024


def _served_model(url: str) -> str:
    import urllib.request

    return json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]


@dataclass(frozen=True)
class Setup:
    """What every point of a run shares: the workload and the backends' flags."""

    args: argparse.Namespace
    groups: list[tuple[str, str]]
    keys: list[str]
    weights: list[float]


def run_point(setup: Setup, name: str, which: str, flow_control: bool, rate: float) -> dict:
    """One router at one rate over fresh engines (every router starts from cold caches); the row printed."""
    global MODEL
    args = setup.args
    if args.backend == "emulated":
        fleet = start_emulated_fleet(args.emulate, 4, *args.emulate_args.split())
        engines, urls = [fleet], fleet.extra["urls"]
        MODEL = _served_model(urls[0])
    else:
        engines = start_fake_engines(4, *args.engine_args.split())
        urls = [e.url for e in engines]
    if which.startswith("sglang:"):
        router = start_sglang_router(urls, which.split(":", 1)[1])
    else:
        start = start_envoy_epp if which.startswith("envoy+epp:") else start_inferstack_gateway
        router = start({
            "pools": {"bench": {"endpoints": urls, "models": [MODEL], "routing": which.removeprefix("envoy+epp:")}},
            "keys": [{"sha256": hashlib.sha256(k.encode()).hexdigest(), "tenant": k[3:]} for k in setup.keys],
            "gateway": {"flow_control": {"enabled": flow_control}},
        })
    try:
        row = asyncio.run(run_rate(router.url + "/v1/chat/completions", setup.groups, rate, args.duration,
                                   seed=int(rate), weights=setup.weights))
        hits, queries = engine_hits(urls)
        trace = row.pop("trace")
        row["router"] = name
        row["hit_rate"] = hits / queries if queries else float("nan")
        if not which.startswith("sglang:"):
            row["decided_by"] = decided_by(router.url)
            row["flow"] = flow_stats(router.url)
            row["misses"] = miss_causes(trace, _cache_entries(args.engine_args))
            row["placement"] = placement(trace)
        index = {u.split("//", 1)[-1]: i for i, u in enumerate(urls)}
        row["endpoint_by_q"] = {q: index.get(ep, -1) for _, _, ep, q in trace}
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_by_q")}), flush=True)
        return row
    finally:
        router.stop()
        for e in engines:
            e.stop()


def print_table(results: list[dict]) -> None:
    cols = ["router", "rate", "sent", "ok", "req_per_s", "hit_rate", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="10,20,30,40")
    ap.add_argument("--duration", type=float, default=12.0)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--peers", default="", help="sglang: sglang-router cache_aware and round_robin")
    ap.add_argument("--popularity", default="uniform", help="uniform | zipf:S (group popularity)")
    ap.add_argument("--flow-control", choices=["on", "off", "both"], default="on",
                    help="inferstack's flow control: on is the default a user gets")
    ap.add_argument("--repeats", type=int, default=1,
                    help="N > 1: flow control on vs off only (first preset of --routers, first rate), N pairs "
                         "of runs in ABBA order, with the paired comparison (onoff_pairs.py)")
    ap.add_argument("--warmup-s", type=float, default=0.0,
                    help="with --repeats: also compare the requests sent after this many seconds (caches warm)")
    ap.add_argument("--engine-args", default=" ".join(ENGINE_ARGS), help="fake engine flags")
    ap.add_argument("--routers", default="default,gie,round-robin", help="inferstack presets to run")
    ap.add_argument("--envoy", action="store_true",
                    help="also run each preset as `inferstack epp serve` behind Envoy (docs/kubernetes.md)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--backend", choices=["fake", "emulated"], default="fake",
                    help="fake: the test engines above; emulated: `engine serve --emulate` (real scheduler, "
                         "paged prefix cache, roofline step times)")
    ap.add_argument("--emulate", default="l4:llama-3-8b")
    ap.add_argument("--emulate-args", default="--num-kv-blocks 1200 --max-num-seqs 8",
                    help="engine flags that make 4 emulated engines saturate at rates this machine can drive")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    groups = workload(args.groups, args.tenants, args.system_tokens)
    setup = Setup(args, groups, sorted({k for k, _ in groups}), popularity(args.popularity, len(groups)))
    if args.repeats > 1:
        preset = args.routers.split(",")[0]
        results = paired_runs(lambda on: run_point(setup, f"inferstack {preset}" + ("" if on else " (off)"),
                                                   preset, on, rates[0]), args.repeats, args.warmup_s)
    else:
        results = [run_point(setup, name, which, fc, rate) for name, which, fc in routers(args) for rate in rates]
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def routers(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(name, which, flow control) per router to run: our presets (with the flow-control modes and fronts
    asked for), then the peers."""
    fc_modes = {"on": [True], "off": [False], "both": [True, False]}[args.flow_control]
    fronts = ["", "envoy+epp:"] if args.envoy else [""]
    out = [(("envoy + inferstack epp " if f else "inferstack ") + p + ("" if fc else " (flow control off)"),
            f + p, fc)
           for p in args.routers.split(",") if p for fc in fc_modes for f in fronts]
    if "sglang" in args.peers:
        out += [("sglang-router cache_aware", "sglang:cache_aware", False),
                ("sglang-router round_robin", "sglang:round_robin", False)]
    return out


if __name__ == "__main__":
    main()
