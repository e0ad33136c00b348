"""Gateway overhead: sequential added latency over going direct, and throughput at concurrency 16/64.

Ours (keys, limits and metrics enabled) side by side with sglang-router (cache_aware, round_robin),
vllm-router (round_robin, cache_aware) and the LiteLLM proxy, each installed by this script into its
own virtual environment (--peers). Same backends for everyone: instant fake OpenAI engines.

    python benchmarks/gateway_overhead.py [--peers sglang,vllm-router,litellm] [--seq 300] [--total 2000]
        [--workers 1,2] [--flow-control-off]

``--workers 1,2`` runs our gateway once per worker count (`gateway.workers`, docs/gateway.md); CPU per
request counts every process of a target (our workers, the peers' threads and processes). ``cN_queued``
is how many of our requests waited in flow control's queue at that concurrency; ``--flow-control-off``
adds a row without flow control, to see what the queue costs.

``--baseline-src DIR`` adds our gateway run from another source tree (e.g. ``git archive`` of an
older commit's ``src``), same run, for before/after comparisons of a change.

``--cpu-reps N`` measures only the gateway's own CPU per request (µs, median of N runs of ``--total``
requests at the last ``--concurrency`` level, targets interleaved run by run): on a busy machine wall-clock
throughput swings 2x between identical runs, CPU seconds per request do not. It also gives each target's req/s
as a ratio to sglang-router round_robin's in the same repetition (median and range of the N ratios).
With ``--baseline-src`` it is a before/after of a change; peers are measured the same way when named.
Each target's CPU is split into user and system time with its context switches per request.
``--syscalls N`` counts each target's system calls per request (strace -c, N requests at the last ``--concurrency``
level). ``--floor`` adds
`gateway_floor.py` (a bare proxy on the same uvicorn stack and upstream client): the part of our CPU that
no trimming of the pipeline can remove.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil
from gateway_common import (
    interleaved_latencies,
    median,
    pct,
    start_fake_engines,
    start_inferstack_gateway,
    start_litellm,
    start_ready_file,
    start_sglang_router,
    start_vllm_router,
    throughput,
)

from inferstack.telemetry import promtext

MODEL = "bench-model"
KEY = "sk-bench-tenant"
REFERENCE_PEER = "sglang-router round_robin"  # the issue's throughput goal is a ratio to this peer


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _switches(pid: int) -> int:
    """Context switches (voluntary + involuntary) of every thread of a process (psutil's count only its first)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            total += sum(int(line.split()[1]) for line in task.read_text().splitlines() if "ctxt_switches" in line)
    return total


def cpu_split(pid: int | None) -> tuple[float, float, int]:
    """User CPU, system CPU and context switches (every thread) of a process and all its descendants (peers run
    worker processes)."""
    user = system = 0.0
    switches = 0
    for p in _tree(pid) if pid is not None else []:
        try:
            t = p.cpu_times()
            switches += _switches(p.pid)
        except (psutil.NoSuchProcess, FileNotFoundError):
            continue
        user, system = user + t.user, system + t.system
    return user, system, switches


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process and all its descendants."""
    user, system, _ = cpu_split(pid)
    return user + system


def queued_requests(gateway_url: str) -> float:
    """Requests our gateway's flow control has queued so far (`inferstack_gateway_queue_wait_seconds`)."""
    import urllib.request

    with urllib.request.urlopen(gateway_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    name = "inferstack_gateway_queue_wait_seconds_count"
    return sum(promtext.parse(text, 0.0, names=frozenset({name})).select(name).values())


def cpu_only(targets: list[tuple], body: bytes, total: int, concurrency: int, reps: int) -> None:
    """CPU µs per request and req/s of each target, runs interleaved across targets so load drifts hit all
    alike; each target's req/s also as a ratio to the reference peer's (sglang-router round_robin) in the same
    repetition, whose median and range say more than one wall-clock run on a busy machine can."""
    samples: dict[str, list[tuple[float, float, float]]] = {t[0]: [] for t in targets}  # user µs, system µs, switches
    rates: dict[str, list[float]] = {t[0]: [] for t in targets}
    for _name, base, headers, _ in targets:  # warm-up: connections, caches, first scrapes
        asyncio.run(throughput(base + "/v1/chat/completions", body, min(total, 500), concurrency, headers))
    for _ in range(reps):
        for name, base, headers, pid in targets:
            before = cpu_split(pid)
            rps, _ = asyncio.run(throughput(base + "/v1/chat/completions", body, total, concurrency, headers))
            after = cpu_split(pid)
            user, system, switches = (a - b for a, b in zip(after, before, strict=True))
            samples[name].append((user / total * 1e6, system / total * 1e6, switches / total))
            rates[name].append(rps)
    ref = next((n for n in rates if n == REFERENCE_PEER), None)
    print(f"\n| target | c{concurrency} CPU µs/req (median of {reps}) | user / system µs | context switches/req "
          f"| runs | c{concurrency} req/s (median) | ÷ {ref or 'reference'} per repetition: median (min-max) |\n"
          "|---|---:|---|---:|---|---:|---|")
    for name, v in samples.items():
        ratio = "–"
        if ref is not None and name != ref:
            r = sorted(a / b for a, b in zip(rates[name], rates[ref], strict=True))
            ratio = f"{median(r):.2f} ({r[0]:.2f}-{r[-1]:.2f})"
        runs = ", ".join(f"{u + k:.0f}" for u, k, _ in v)
        split = f"{median([u for u, _, _ in v]):.0f} / {median([k for _, k, _ in v]):.0f}"
        print(f"| {name} | {median([u + k for u, k, _ in v]):.0f} | {split} | {median([c for _, _, c in v]):.2f} "
              f"| {runs} | {median(rates[name]):.0f} | {ratio} |")


def syscalls(targets: list[tuple], body: bytes, total: int, concurrency: int) -> None:
    """System calls per request of each target (`strace -c -f` attached to every thread of the target's processes
    while it serves ``total`` requests after a warm-up): which calls, how many, errors. strace slows system calls,
    so this counts them; it does not time them."""
    for name, base, headers, pid in targets:
        url = base + "/v1/chat/completions"
        asyncio.run(throughput(url, body, min(total, 500), concurrency, headers))
        out = Path(tempfile.mkdtemp(prefix="gwbench-strace-")) / "counts"
        tids = [str(t.id) for p in _tree(pid) for t in p.threads()]
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), *(a for t in tids for a in ("-p", t))],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached to every thread (strace has no readiness signal)
        asyncio.run(throughput(url, body, total, concurrency, headers))
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        print(f"\n{name}: system calls per request ({total} requests, c{concurrency})")
        for line in out.read_text().splitlines():
            f = line.split()  # % time, seconds, usecs/call, calls, [errors], syscall
            if len(f) in (5, 6) and f[3].isdigit() and f[-1].isidentifier():
                errors = f" ({int(f[4]) / total:.2f} failed)" if len(f) == 6 else ""
                print(f"  {f[-1]:<16} {int(f[3]) / total:7.3f}{errors}")


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="", help="comma list of: sglang, vllm-router, litellm")
    ap.add_argument("--seq", type=int, default=300, help="sequential requests per target")
    ap.add_argument("--total", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--workers", default="1", help="comma list of our gateway's worker counts, e.g. 1,2")
    ap.add_argument("--flow-control-off", action="store_true",
                    help="also run our gateway (default preset, 1 worker) with flow_control.enabled: false")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also run our gateway (default preset) from this src/ directory, as a baseline")
    ap.add_argument("--floor", action="store_true",
                    help="also run a bare ASGI proxy on our server stack (benchmarks/gateway_floor.py)")
    ap.add_argument("--cpu-reps", type=int, default=0,
                    help="only measure CPU µs per request, median of this many runs per target (see above)")
    ap.add_argument("--syscalls", type=int, default=0,
                    help="only count each target's system calls per request (strace -c) over this many requests")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    peers = [p for p in args.peers.split(",") if p]

    engines = start_fake_engines(2, "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "8")
    workers = [e.url for e in engines]
    body = orjson.dumps({"model": MODEL, "max_tokens": 8,
                         "messages": [{"role": "user", "content": "x" * 200}]})
    results: list[dict] = []
    procs = []
    try:
        targets = [("direct (1 engine)", workers[0], {}, None)]
        gw_cfg = {
            "pools": {"bench": {"endpoints": workers, "models": [MODEL]}},
            "keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "bench"}],
            "tenants": {"bench": {"rpm": 10_000_000, "tpm": 10_000_000_000}},
        }
        for n in [int(w) for w in args.workers.split(",")]:
            for preset in ("default", "round-robin"):
                gw_cfg["pools"]["bench"]["routing"] = preset
                gw_cfg["gateway"] = {"workers": n}
                gw = start_inferstack_gateway(json.loads(json.dumps(gw_cfg)))
                procs.append(gw)
                name = f"inferstack {preset}" + (f", {n} workers" if n > 1 else "")
                targets.append((name, gw.url, {"authorization": f"Bearer {KEY}"}, gw.proc.pid))
        if args.flow_control_off:
            gw_cfg["pools"]["bench"]["routing"] = "default"
            gw_cfg["gateway"] = {"flow_control": {"enabled": False}}
            gw = start_inferstack_gateway(json.loads(json.dumps(gw_cfg)))
            procs.append(gw)
            targets.append(("inferstack default, flow control off", gw.url, {"authorization": f"Bearer {KEY}"},
                            gw.proc.pid))
        if args.baseline_src is not None:
            gw_cfg["pools"]["bench"]["routing"] = "default"
            gw_cfg.pop("gateway", None)  # an older tree may not know `gateway.workers`
            gw = start_inferstack_gateway(json.loads(json.dumps(gw_cfg)), src=args.baseline_src.resolve())
            procs.append(gw)
            targets.append(("inferstack default (baseline)", gw.url, {"authorization": f"Bearer {KEY}"},
                            gw.proc.pid))
        if args.floor:
            fl = start_ready_file("floor", [sys.executable, str(Path(__file__).with_name("gateway_floor.py")),
                                            *(a for w in workers for a in ("--upstream", w)), "--port", "0"])
            procs.append(fl)
            targets.append(("bare proxy on our server stack (floor)", fl.url, {}, fl.proc.pid))
        if "sglang" in peers:
            for policy in ("round_robin", "cache_aware"):
                p = start_sglang_router(workers, policy)
                procs.append(p)
                targets.append((p.name, p.url, {}, p.proc.pid))
        if "vllm-router" in peers:
            for policy in ("round_robin", "cache_aware"):
                p = start_vllm_router(workers, policy)
                procs.append(p)
                targets.append((p.name, p.url, {}, p.proc.pid))
        if "litellm" in peers:
            # one worker: with --num_workers 2 its workers died in a loop at start-up on this machine
            p = start_litellm(workers, MODEL, num_workers=1)
            procs.append(p)
            targets.append((p.name, p.url, {"authorization": f"Bearer {p.extra['key']}"}, p.proc.pid))

        if args.syscalls:
            syscalls(targets[1:], body, args.syscalls, levels[-1])
            return
        if args.cpu_reps:
            cpu_only(targets[1:], body, args.total, levels[-1], args.cpu_reps)
            return
        seqs = asyncio.run(interleaved_latencies([(b + "/v1/chat/completions", h) for _, b, h, _ in targets],
                                                 body, args.seq))
        direct = seqs[0]
        for (name, base, headers, pid), seq in zip(targets, seqs, strict=True):
            url = base + "/v1/chat/completions"
            row = {"target": name, "seq_p50_ms": median(seq) * 1e3, "seq_p99_ms": pct(seq, 0.99) * 1e3}
            row["added_p50_ms"] = row["seq_p50_ms"] - median(direct) * 1e3
            row["added_p99_ms"] = row["seq_p99_ms"] - pct(direct, 0.99) * 1e3
            total = args.total if "litellm" not in name else max(200, args.total // 10)
            ours = name.startswith("inferstack")
            for c in levels:
                cpu0 = cpu_seconds(pid)
                queued0 = queued_requests(base) if ours else 0.0
                rps, lat = asyncio.run(throughput(url, body, total, c, headers))
                if pid is not None:
                    # CPU the router spent per request: robust to a busy machine, unlike wall time
                    row[f"c{c}_cpu_ms_per_req"] = (cpu_seconds(pid) - cpu0) / total * 1e3
                if ours:  # requests that waited in flow control's queue (the engines' /metrics lag)
                    row[f"c{c}_queued"] = int(queued_requests(base) - queued0)
                row[f"c{c}_rps"] = rps
                row[f"c{c}_p50_ms"] = median(lat) * 1e3
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for p in procs + engines:
            p.stop()

    cols = ["target", "seq_p50_ms", "seq_p99_ms", "added_p50_ms", "added_p99_ms"] + [
        k for c in levels for k in (f"c{c}_rps", f"c{c}_p50_ms", f"c{c}_cpu_ms_per_req", f"c{c}_queued")]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(_fmt(r.get(c, "-")) for c in cols) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
