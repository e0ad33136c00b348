"""`caching`: multi-tier KV caching across workload patterns and replicas.

Two real CPU engines of the bundled model behind the gateway with round-robin routing (so a
conversation's next turn usually lands on the *other* replica), each with a device KV cache that
holds about one prompt: the device prefix cache alone forgets a prefix as soon as another prompt
needs the blocks and never sees the other replica's work. Each tier configuration (`inferstack up
--kv-tiers ...`: host RAM per replica, a disk directory both replicas share, a Redis both share)
runs the same `inferstack bench` workloads on a fresh stack: a shared system prompt, multi-turn
chat, agentic fan-out over a shared context, and many questions about one long document. Hit
rates come from the server (`cached_tokens`: device + tiers) and its metrics (tokens loaded from
the tiers, chunk hits per tier)."""

from __future__ import annotations

import re

import httpx

from inferstack.lab.base import Lab, LabResult, Table, debian_binary
from inferstack.lab.labs._common import completed, hit_rate, latency, ms
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabRun
from inferstack.telemetry import promtext

# The device KV cache holds about one prompt (24 MiB is ~540 tokens of this model in fp32) in a quick
# run and about two in a full one, so the device alone forgets prefixes that recur later.
QUICK_ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-bytes", "24MiB"]
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-bytes", "48MiB"]
# name, tiers ("" = device only)
CONFIGS = (("device only", ""), ("host", "host"), ("disk (shared)", "disk"), ("redis (shared)", "redis"),
           ("host+disk+redis", "host,disk,redis"))
QUICK_CONFIGS = (CONFIGS[0], CONFIGS[4])
# name, workload, units in flight: a closed loop, because a CPU engine's speed varies a lot with the
# machine's load and a fixed rate would only queue behind it. Tiers store full 256-token chunks, so every
# shared part is longer than one chunk; prompts stay short because a CPU engine prefills a few hundred
# tokens per second at best. One unit in flight in a quick run: with round-robin, consecutive requests
# alternate replicas, so a recurring prefix is found on the other replica or not at all.
WORKLOADS = (
    ("shared prefix", "shared-prefix:groups=3,users=4,system=520,question=24,output=8", 2),
    ("multi-turn", "multi-turn:turns=3,system=260,input=120,output=16", 2),
    ("agentic fan-out", "agentic:fanout=3,context=520,input=24,output=8,aggregate=0", 1),
    ("long context", "shared-prefix:groups=2,users=6,system=900,question=16,output=8", 2),
)
QUICK_WORKLOADS = (
    ("shared prefix", "shared-prefix:groups=3,users=3,system=270,question=16,output=4", 1),
    ("multi-turn", "multi-turn:turns=2,system=270,input=40,output=8", 1),
)
_WANTED = ("vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:external_prefix_cache_hits_total",
           "inferstack_kv_tier_hits_total")
COLUMNS = ["tiers", "workload", "completed", "hit rate", "from tiers", "host hits", "disk hits", "redis hits",
           "TTFT p50 (ms)", "TTFT p90 (ms)"]


def _scrape(engines: list[str]) -> list[promtext.Scrape]:
    return [promtext.parse(httpx.get(f"{e}/metrics", timeout=10).text, 0.0, names=_WANTED) for e in engines]


def _increase(before: list[promtext.Scrape], after: list[promtext.Scrape], name: str,
              by: str | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for old, new in zip(before, after, strict=True):
        for k, v in promtext.counter_increase(old, new, name, by).items():
            out[k] = out.get(k, 0.0) + v
    return out


def _row(config: str, workload: str, s: dict, before: list, after: list) -> list:
    prompt = _increase(before, after, "vllm:prompt_tokens_total").get("", 0.0)
    external = _increase(before, after, "vllm:external_prefix_cache_hits_total").get("", 0.0)
    tiers = _increase(before, after, "inferstack_kv_tier_hits_total", "tier")
    return [config, workload, completed(s), hit_rate(s), external / prompt if prompt else None,
            *(int(tiers.get(t, 0)) for t in ("host", "disk", "redis")),
            ms(latency(s, "ttft", "p50")), ms(latency(s, "ttft", "p90"))]


def run(lab: LabRun) -> LabResult:
    configs, workloads = (QUICK_CONFIGS, QUICK_WORKLOADS) if lab.quick else (CONFIGS, WORKLOADS)
    engine_args = QUICK_ENGINE_ARGS if lab.quick else ENGINE_ARGS
    duration = 7.0 if lab.quick else 40.0
    rows = []
    for config, tiers in configs:
        up = {"threads": 1, "replicas": 2, "engine_args": engine_args, "gateway_args": ["--routing", "round-robin"]}
        if tiers:
            up["kv"] = {"tiers": tiers.split(",")}
        with lab.stack(config={"up": up}) as stack:
            for name, workload, inflight in workloads:
                before = _scrape(stack.engines)
                s = lab.bench(stack.gateway, workload, re.sub(r"[^a-z0-9]+", "-", f"{config} {name}"),
                              duration=duration, extra=("--concurrency", str(inflight)), drain_s=60)
                rows.append(_row(config, name, s, before, _scrape(stack.engines)))
    table = Table(f"2 real engines (bundled model, 1 thread each, device KV cache of {engine_args[-1]}), round-robin "
                  f"routing, {duration:g} s per workload; hit rate = cached / prompt tokens (device + tiers), "
                  "from tiers = share of prompt tokens loaded from a tier, tier hits in 256-token chunks",
                  COLUMNS, rows)
    names = [w[0] for w in workloads]
    series = {c: [next((r[3] or 0.0) for r in rows if r[0] == c and r[1] == w) for w in names] for c, _ in configs}
    ttft = {c: [next((r[8] or 0.0) for r in rows if r[0] == c and r[1] == w) for w in names] for c, _ in configs}
    plots = [bar_plot(lab.out / "hit_rate.png", "Prefix hit rate by workload and tiers", "cached / prompt tokens",
                      series, names),
             bar_plot(lab.out / "ttft.png", "TTFT p50 by workload and tiers", "ms", ttft, names)]
    setup = [f"workloads: {'; '.join(f'{n}: `{w}`, {c} in flight' for n, w, c in workloads)}",
             "tier configurations (a fresh stack each): " + ", ".join(f"`{t or 'none'}`" for _, t in configs),
             "`inferstack up --replicas 2 --kv-tiers ...` with `up.engine_args: " + " ".join(engine_args) + "`"]
    return LabResult(_findings(rows, configs, names, lab.quick), [table], plots, {"rows": rows}, setup)


def _findings(rows: list[list], configs: tuple, workloads: list[str], quick: bool) -> list[str]:
    out, shared_only = [], []
    base, best_cfg = configs[0][0], configs[-1][0]
    for w in workloads:
        by = {r[0]: r for r in rows if r[1] == w}
        dev, tier = by[base], by[best_cfg]
        if dev[3] is None or tier[3] is None:
            out.append(f"{w}: no hit rate reported (completed {dev[2]} / {tier[2]} requests).")
            continue
        shared = tier[6] + tier[7]
        out.append(f"{w}: hit rate {dev[3]:.0%} with `{base}`, {tier[3]:.0%} with `{best_cfg}` "
                   f"({tier[4] or 0:.0%} of prompt tokens loaded from a tier; chunk hits host {tier[5]}, "
                   f"disk {tier[6]}, redis {tier[7]}); TTFT p50 {dev[8] or 0:.0f} → {tier[8] or 0:.0f} ms.")
        if shared and tier[5] == 0:
            shared_only.append(w)
    if shared_only:
        out.append(f"Every tier hit of {', '.join(shared_only)} came from a shared tier (disk or Redis), none "
                   "from host RAM: with round-robin the next request sharing a prefix lands on the other replica, "
                   "whose host RAM never saw it.")
    fewest = min(r[2] for r in rows)
    if fewest < 5:
        more = "a full run sends more" if quick else "the machine was slow or busy"
        out.append(f"Only {fewest} requests completed in some runs (CPU engines, a closed loop): the hit rates "
                   f"show the mechanism, the TTFT differences are indicative; {more}.")
    gains = [(r[1], r[3] - d[3]) for r in rows for d in rows
             if r[0] == best_cfg and d[0] == base and r[1] == d[1] and r[3] is not None and d[3] is not None]
    if gains:
        top, low = max(gains, key=lambda g: g[1]), min(gains, key=lambda g: g[1])
        out.append(f"The tiers added the most hits on {top[0]} (+{top[1]:.0%}) and the least on {low[0]} "
                   f"({low[1]:+.0%}): a tier pays where prefixes recur after the device cache has moved on, or on "
                   "another replica.")
    return out


LAB = Lab(
    name="caching", week=2, title="Multi-tier caching",
    question="Which KV tier (device only, host RAM, shared disk, shared Redis) pays off for which workload, "
             "on one replica and across replicas?",
    teaches="prefix hit rate and TTFT per KV tier and workload (shared prefix, multi-turn, agentic, long context)",
    needs=("2 real CPU engines of the bundled model (inferstack up --kv-tiers)", "gateway (round-robin)",
           "redis-server (started by inferstack up)", "inferstack bench"),
    minutes=15.0, run=run, unmet=debian_binary("redis-server"))
