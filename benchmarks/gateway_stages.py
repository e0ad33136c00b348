"""CPU µs per request in each stage of our gateway's pipeline, in process, no network.

The same configuration as `gateway_overhead.py` (keys, RPM/TPM limits, metrics, flow control on; one
pool of two endpoints), driven request by request through the stages the HTTP front end runs: arrive
(request id, header map), read the body, `Pipeline.start` (authenticate, parse, resolve, admit, plan),
pick (routing), hold and the upstream request head, account, release, close. The endpoints are never
contacted. Each stage is timed with the process CPU clock (about 0.3 µs per reading); the best of
``--reps`` passes is reported. Together with `gateway_overhead.py --cpu-reps --floor` (the whole process,
and a bare proxy on the same server stack) it says where a request's CPU goes (docs/benchmarks.md).

    python benchmarks/gateway_stages.py [--routing default|round-robin|...] [--requests 5000] [--reps 3]
        [--system-chars 2000] [--flow-control on,off]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time

import orjson
import uvloop

from inferstack.config.schema import InferstackConfig
from inferstack.gateway.pipeline.context import Inbound
from inferstack.gateway.pipeline.core import Pipeline
from inferstack.gateway.server import _read_body
from inferstack.gateway.upstream import UpstreamPool

KEY = "sk-bench-tenant"
MODEL = "bench-model"
HEADERS = [(b"host", b"127.0.0.1:8000"), (b"authorization", f"Bearer {KEY}".encode()),
           (b"content-type", b"application/json"), (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate")]
USAGE = {"prompt_tokens": 50, "completion_tokens": 8, "total_tokens": 58}


def request_body(system_chars: int) -> bytes:
    """A 200-character user turn, after a system prompt of ``system_chars`` (the same in every request)."""
    system = [{"role": "system", "content": "s" * system_chars}] if system_chars else []
    user = {"role": "user", "content": "x" * 200}
    return orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": [*system, user]})


def config(routing: str, flow_control: bool = True) -> InferstackConfig:
    return InferstackConfig.model_validate({
        "pools": {"bench": {"endpoints": ["http://127.0.0.1:9", "http://127.0.0.1:10"], "models": [MODEL],
                            "routing": routing}},
        "keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "bench"}],
        "tenants": {"bench": {"rpm": 10_000_000, "tpm": 10_000_000_000}},
        "gateway": {"flow_control": {"enabled": flow_control}}})


async def one_pass(p: Pipeline, n: int, body: bytes) -> dict[str, float]:
    """µs per request in each stage over ``n`` requests."""
    clock, acc = time.process_time, dict.fromkeys(
        ("arrive", "read body", "start", "pick", "hold + head", "account", "release", "close"), 0.0)

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = dict(HEADERS) | {b"content-length": str(len(body)).encode()}

    for _ in range(n):
        t0 = clock()
        inbound = Inbound.arrive("chat", dict(headers), p.request_ids)
        t1 = clock()
        got = await _read_body(receive, inbound.headers.get(b"content-length"), 1 << 20, 30.0)
        t2 = clock()
        gone = asyncio.get_running_loop().create_future()
        ctx = await p.start(inbound, got, client_gone=gone)
        t3 = clock()
        picked = p.picker.pick(ctx)
        t4 = clock()
        ep = picked.endpoint
        p.picker.hold(ctx, ep)
        ep.post_head(inbound.path, inbound.rid)
        t5 = clock()
        await p.account.finish(ctx, time.perf_counter(), USAGE, 1)
        t6 = clock()
        p.picker.release(ctx, ep)
        p.picker.succeeded(ctx, ep)
        t7 = clock()
        await p.close(ctx)
        t8 = clock()
        gone.cancel()
        for k, d in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7), strict=True):
            acc[k] += d
    return {k: v / n * 1e6 for k, v in acc.items()}


async def run(routing: str, n: int, reps: int, body: bytes, flow_control: bool = True) -> dict[str, float]:
    p = Pipeline(config(routing, flow_control))
    for pool in p.pools.values():
        for e in pool.endpoints:  # never connected: only its request head is built
            e.upstream = UpstreamPool(e.url, 1.0, 1.0)
    passes = [await one_pass(p, n, body) for _ in range(reps)]
    return {k: min(x[k] for x in passes) for k in passes[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", default="default,round-robin", help="comma list of routing presets")
    ap.add_argument("--requests", type=int, default=5000, help="requests per pass")
    ap.add_argument("--reps", type=int, default=3, help="passes; the best per stage is reported")
    ap.add_argument("--flow-control", default="on", help="comma list of on / off: flow control's admission check "
                    "is part of `start` (a pass-through request's cost: the on - off difference)")
    ap.add_argument("--system-chars", type=int, default=0,
                    help="a system prompt of this many characters before the user turn, the same in every request")
    args = ap.parse_args()
    body = request_body(args.system_chars)
    rows = {f"{r}{'' if fc == 'on' else ' (flow control off)'}":
            uvloop.run(run(r, args.requests, args.reps, body, fc == "on"))
            for r in args.routing.split(",") for fc in args.flow_control.split(",")}
    stages = list(next(iter(rows.values())))
    print("| routing | " + " | ".join(stages) + " | sum |\n|---|" + "---:|" * (len(stages) + 1))
    for r, v in rows.items():
        print(f"| {r} | " + " | ".join(f"{v[s]:.1f}" for s in stages) + f" | {sum(v.values()):.1f} |")


if __name__ == "__main__":
    main()
