"""The `routing` lab's first part: routing by model size and latency requirement.

Two pools behind one gateway: `default`, the bundled SmolLM2-135M (`inferstack up`; emulated on this
CPU's calibrated profile in a quick run, the real model in a full one), and `large`, a Llama-3-8B on
an H100 (`inferstack engine serve --emulate h100:llama-3-8b`). The model a request names picks the
pool (each pool serves its own model), and each latency class has its own API key, whose
objective sets the request's priority (`interactive` 10, `batch` -1: sheddable) and whose models
limit what it may call. Both classes send at once, each with its own SLO, and the report says which
route met its objective."""

from __future__ import annotations

import concurrent.futures
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from inferstack.gateway.auth import hash_key
from inferstack.lab.base import Table
from inferstack.lab.labs._common import completed, latency, ms
from inferstack.lab.runtime import LabRun
from inferstack.sim.models import get_model

SMALL, LARGE = "smollm2-135m", "llama-3-8b"


@dataclass(frozen=True)
class LatencyClass:
    name: str            # also the objective's name
    priority: int
    route: str           # the model requested, which picks the pool
    workload: str
    rate: float          # requests/s in a quick run (the small model emulated)
    rate_full: float     # ... in a full run (the real model on this CPU: a single-thread engine serves ~1/s)
    slo: str             # `inferstack bench --slo`


CLASSES = (
    LatencyClass("interactive", 10, get_model(SMALL).name, "synthetic:input=64,output=16", 2.0, 0.7, "ttft=1s"),
    LatencyClass("batch", -1, get_model(LARGE).name, "synthetic:input=1500,output=128", 2.0, 2.0,
                 "ttft=2s,tpot=50ms"),
)


def _config(large_url: str, keys: dict[str, str], quick: bool) -> dict:
    up: dict = {"replicas": 1}
    if quick:
        up["emulate"] = f"cpu:{SMALL}"
    return {
        "up": up,
        "pools": {"large": {"endpoints": [{"url": large_url, "name": "h100-8b"}]}},
        "objectives": {c.name: {"priority": c.priority} for c in CLASSES},
        "keys": [{"sha256": hash_key(keys[c.name]), "tenant": c.name, "objective": c.name, "models": [c.route]}
                 for c in CLASSES],
        "tenants": {c.name: {} for c in CLASSES},
    }


def _ready_url(ready: Path) -> str | None:
    text = ready.read_text().strip() if ready.exists() else ""
    return json.loads(text)["urls"][0] if text else None


def run_two_pools(lab: LabRun) -> tuple[Table, list[str], list[list]]:
    ready = lab.out / "logs" / "large.ready.json"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "inferstack", "engine", "serve", "--emulate", f"h100:{LARGE}", "--port", "0",
            "--ready-file", str(ready)]
    duration = 6.0 if lab.quick else 30.0
    keys = {c.name: secrets.token_urlsafe(16) for c in CLASSES}
    with lab.process("large-pool-engine", argv, lambda: _ready_url(ready) is not None, timeout_s=120):
        config = _config(_ready_url(ready), keys, lab.quick)
        with lab.stack(config=config) as stack, concurrent.futures.ThreadPoolExecutor(len(CLASSES)) as pool:
            runs = {c.name: pool.submit(lab.bench, stack.gateway, c.workload, f"class-{c.name}",
                                        rate=c.rate if lab.quick else c.rate_full,
                                        duration=duration, drain_s=30,
                                        extra=("--model", c.route, "--api-key", keys[c.name], "--slo", c.slo))
                    for c in CLASSES}
            summaries = {name: f.result() for name, f in runs.items()}
    rows = []
    for c in CLASSES:
        s = summaries[c.name]
        slo = s.get("slo") or {}
        rows.append([c.name, completed(s), c.route, c.priority, c.slo, slo.get("attainment"),
                     ms(latency(s, "ttft", "p50")), ms(latency(s, "ttft", "p90")), ms(latency(s, "tpot", "p50")),
                     _statuses(s["requests"]["by_status"])])
    small = f"emulated {SMALL} on this CPU's profile (quick run)" if lab.quick else f"the real {SMALL} (1 replica)"
    table = Table(f"Two pools: `default` = {small}, `large` = emulated {LARGE} on an H100; both classes at once for "
                  f"{duration:g} s", ["class (objective)", "completed", "route (model)", "priority", "SLO",
                                      "SLO attainment", "TTFT p50 (ms)", "TTFT p90 (ms)", "TPOT p50 (ms)",
                                      "answers"], rows)
    return table, _findings(rows), rows


def _findings(rows: list[list]) -> list[str]:
    out = []
    for name, done, route, _, slo, attained, ttft50, _, tpot50, statuses in rows:
        if not done:
            out.append(f"`{name}` traffic on `{route}`: none completed ({statuses}): this route was "
                       "overloaded at this rate on this machine; flow control answers 429 once a request has queued "
                       "too long.")
            continue
        met = "no SLO result" if attained is None else f"{attained:.0%} of requests met `{slo}`"
        out.append(f"`{name}` traffic on `{route}`: {done} completed ({statuses}), {met}; TTFT p50 "
                   f"{ttft50 or 0:.0f} ms, TPOT p50 {tpot50 or 0:.1f} ms.")
    fast_ttft, big_ttft = rows[0][6], rows[1][6]
    if fast_ttft and big_ttft:
        how = f"{big_ttft / fast_ttft:.1f}x sooner" if fast_ttft < big_ttft else f"{fast_ttft / big_ttft:.1f}x later"
        out.append(f"The small model's first token came {how} than the 8B route's here (TTFT p50 "
                   f"{fast_ttft:.0f} vs {big_ttft:.0f} ms): size per route is a latency decision as much as a "
                   "quality one, and a key's objective keeps a batch tenant sheddable wherever it routes.")
    return out


def _statuses(by_status: dict[str, int]) -> str:
    """"58 ok, 3 http_429": how the requests ended, most common first."""
    return ", ".join(f"{n} {status}" for status, n in sorted(by_status.items(), key=lambda kv: -kv[1]))
