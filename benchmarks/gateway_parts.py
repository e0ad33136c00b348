"""CPU µs of each part of our gateway's request pipeline, one part at a time in a hot loop (no network).

`gateway_stages.py` times the stages one request after another; this takes them apart: authentication, body
parsing, prompt facts, the engine body, rate limits, flow control's free-slot check, the pool snapshot, prefix
hashing, routing (each filter and scorer of the preset alone, the whole pick, the routing state's record, the
prefix index's match and insert) and accounting. Same configuration as `gateway_stages.py` (keys, RPM/TPM limits,
metrics, flow control on; two endpoints that are never contacted), one request repeated; the pipeline is warmed
by ``--warmup`` whole requests first. Each part is the best of ``--reps`` loops of ``--calls`` calls (process
CPU clock). A part in a hot loop runs with its code and data in cache: the parts add up to less than the
stages' own timings, which pay the misses of a whole request's path (docs/benchmarks.md, c21t).

    python benchmarks/gateway_parts.py [--routing default] [--system-chars 0] [--calls 20000] [--reps 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop
from gateway_stages import HEADERS, USAGE, config, one_pass, request_body

from inferstack.gateway.limits import settle_reservation_now
from inferstack.gateway.pipeline.context import Inbound, RequestContext
from inferstack.gateway.pipeline.core import Pipeline
from inferstack.gateway.pipeline.parse import parse_body
from inferstack.gateway.requests import prompt_facts
from inferstack.gateway.routing.filters import within_cap
from inferstack.gateway.routing.state import RouteContext
from inferstack.gateway.upstream import UpstreamPool


def best_us(f: Callable[[], Any], calls: int, reps: int) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        for _ in range(calls):
            f()
        best = min(best, time.process_time() - t0)
    return best / calls * 1e6


def drive(make: Callable[[], Coroutine[Any, Any, Any]]) -> Callable[[], Any]:
    """A coroutine that never suspends, run to its end by a plain call."""
    def run() -> Any:
        try:
            make().send(None)
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("the part suspended")
    return run


def request_parts(p: Pipeline, body: bytes) -> list[tuple[str, Callable[[], Any]]]:
    """The stages before routing, each alone, on one admitted request's records."""
    headers = dict(HEADERS) | {b"content-length": str(len(body)).encode()}
    inbound = Inbound.arrive("chat", dict(headers), p.request_ids)
    caller = p.auth.authenticate(inbound.headers)
    req = parse_body(body)
    route = p.spiller.divert(p.resolver.resolve(req["model"]), caller)
    facts = prompt_facts("chat", req, p.cfg.gateway.http.max_prompts)
    engine = p.planner.engine_body(parse_body(body), caller, route)
    pool, flow, admitter = route.pool, p.flow[route.pool.name], p.admitter
    seed = route.upstream_model + "\x00" + caller.salt

    def limits() -> None:
        res = admitter._limits(caller, facts.prompt_tokens + 64)
        if res is not None:
            settle_reservation_now(p.limiter, res, 0)

    return [
        ("arrive (request id, header map)", lambda: Inbound.arrive("chat", dict(headers), p.request_ids)),
        ("authenticate", lambda: p.auth.authenticate(inbound.headers)),
        ("parse body (orjson)", lambda: parse_body(body)),
        ("resolve + spill check", lambda: p.spiller.divert(p.resolver.resolve(req["model"]), caller)),
        ("prompt facts", lambda: prompt_facts("chat", req, p.cfg.gateway.http.max_prompts)),
        ("engine body (with its own parse)", lambda: p.planner.engine_body(parse_body(body), caller, route)),
        ("limits: acquire + settle", limits),
        ("pool snapshot", pool.snapshot),
        ("flow control check (snapshot + free slots)", lambda: flow.passes(0, lambda: pool.free_slots())),
        ("prefix hashes", lambda: p.planner.hasher.hashes(facts.parts, seed)),
        ("plan (prefix hashes + request view)", lambda: p.planner.plan_now(req, engine, facts, caller, route, None)),
        ("start (all of the above but arrive)", drive(lambda: p.start(inbound, body))),
    ]


def routing_parts(ctx: RequestContext, p: Pipeline) -> list[tuple[str, Callable[[], Any]]]:
    """Routing of ``ctx`` over a fresh snapshot: the pick, its record, the preset's filters and scorers alone."""
    pool, view = ctx.route.pool, ctx.plan.view
    router, snap = pool.router, pool.snapshot()
    state, ep = router.state, pool.endpoints[0].id
    cands = within_cap(list(snap.endpoints))
    fresh = lambda: RouteContext(view, snap, state)  # noqa: E731 (a context caches its matches)
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("route context + cold check (prefix match)", lambda: fresh().cold()),
        ("prefix index match", lambda: state.approx.match(view.prefix_hashes)),
        ("route (record deferred)", lambda: router.route(view, snap, True)),
        ("record: prefix insert + roots + cold LRU", lambda: router._record(view, ep, False, None)),
        ("prefix index insert", lambda: state.approx.insert(ep, view.prefix_hashes)),
        ("shared-prompt roots", lambda: state.roots.record(ep, view.prefix_hashes[0])),
        ("decisions metric", lambda: p.metrics.decision(pool.name, "default", "prefix")),
    ]
    policy = getattr(router.handler, "policy", None)
    for name, f in getattr(policy, "filters", ()):
        parts.append((f"filter {name}", lambda f=f: f(fresh(), cands)))
    for name, s, w in getattr(policy, "scorers", ()):
        if w:
            parts.append((f"scorer {name}", lambda s=s: s(fresh(), cands)))

    def pick() -> None:
        ctx.admission.snapshot = snap
        p.picker.pick(ctx, (), False)
    parts.append(("pick (snapshot given) + commit", pick))
    return parts


async def measure(routing: str, body: bytes, warmup: int, calls: int, reps: int) -> list[tuple[str, float]]:
    p = Pipeline(config(routing))
    for pool in p.pools.values():
        for e in pool.endpoints:  # never connected: only its request head is built
            e.upstream = UpstreamPool(e.url, 1.0, 1.0)
    await one_pass(p, warmup, body)
    ctx = await p.start(Inbound.arrive("chat", dict(HEADERS), p.request_ids), body)
    parts = request_parts(p, body) + routing_parts(ctx, p)
    parts.append(("account finish (metrics)", lambda: p.account.finish(ctx, time.perf_counter(), USAGE, 1)))
    return [(name, best_us(f, calls, reps)) for name, f in parts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", default="default", help="routing preset")
    ap.add_argument("--system-chars", type=int, default=0, help="a system prompt of this many characters")
    ap.add_argument("--warmup", type=int, default=300, help="whole requests through the stages first")
    ap.add_argument("--calls", type=int, default=20000, help="calls per timed loop")
    ap.add_argument("--reps", type=int, default=3, help="loops per part; the best is reported")
    args = ap.parse_args()
    rows = uvloop.run(measure(args.routing, request_body(args.system_chars), args.warmup, args.calls, args.reps))
    print(f"| part ({args.routing}, system prompt {args.system_chars} chars) | µs |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
