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

``--instructions SRC[,SRC...]`` counts instead the CPU instructions per request of the whole pass (every stage)
for each source tree (``.``: this one) under valgrind's callgrind: the difference between a run of
``--requests`` requests and one of six times as many, divided by the extra requests, so start-up and imports
cancel out. Whatever else the machine runs, it repeats to ~3 % (string hashing is seeded the same in every run;
the garbage collector's timing still varies): the before/after measure for changes of a few µs that CPU timings
on a busy machine cannot resolve; run it twice (~4 min per tree at 200 requests on a busy machine).

    python benchmarks/gateway_stages.py --instructions /tmp/base/src,. [--routing default] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

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
        done = p.account.finish(ctx, time.perf_counter(), USAGE, 1)
        if inspect.isawaitable(done):  # an older tree (`--instructions`): finish was a coroutine
            await done
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


def instructions(src: str, routing: str, n: int, system_chars: int) -> float:
    """Instructions per request of a pass through the stages, ``src`` on PYTHONPATH (see the module doc)."""
    counts = []
    for count in (n, 6 * n):
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--routing", routing, "--requests", str(count), "--reps", "1", "--system-chars", str(system_chars),
               "--quiet"]
        tree = Path(src).resolve()
        tree = tree / "src" if (tree / "src" / "inferstack").is_dir() else tree  # a checkout's root: its src/
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
        counts.append(int(re.search(r"refs:\s+([\d,]+)", out).group(1).replace(",", "")))
    return (counts[1] - counts[0]) / (5 * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", default="default,round-robin", help="comma list of routing presets")
    ap.add_argument("--requests", type=int, default=5000, help="requests per pass")
    ap.add_argument("--reps", type=int, default=3, help="passes; the best per stage is reported")
    ap.add_argument("--flow-control", default="on", help="comma list of on / off: flow control's admission check "
                    "is part of `start` (a pass-through request's cost: the on - off difference)")
    ap.add_argument("--system-chars", type=int, default=0,
                    help="a system prompt of this many characters before the user turn, the same in every request")
    ap.add_argument("--instructions", default="", help="comma list of source trees: instructions per request")
    ap.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # `instructions`' own runs
    args = ap.parse_args()
    if args.instructions:
        routing = args.routing.split(",")[0]
        for src in args.instructions.split(","):
            per = instructions(src, routing, args.requests, args.system_chars)
            print(f"{src} ({routing}): {per:,.0f} instructions per request")
        return
    body = request_body(args.system_chars)
    rows = {f"{r}{'' if fc == 'on' else ' (flow control off)'}":
            uvloop.run(run(r, args.requests, args.reps, body, fc == "on"))
            for r in args.routing.split(",") for fc in args.flow_control.split(",")}
    if args.quiet:
        return
    stages = list(next(iter(rows.values())))
    print("| routing | " + " | ".join(stages) + " | sum |\n|---|" + "---:|" * (len(stages) + 1))
    for r, v in rows.items():
        print(f"| {r} | " + " | ".join(f"{v[s]:.1f}" for s in stages) + f" | {sum(v.values()):.1f} |")


if __name__ == "__main__":
    main()
