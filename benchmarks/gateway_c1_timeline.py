"""Where a lone request's time goes inside the gateway (concurrency 1), from system-call timestamps.

One fake engine, our gateway (keys, limits, metrics, flow control on; or ``--floor``: the bare proxy of
`gateway_floor.py`), a blocking raw-socket client sending sequential requests on one keep-alive connection.
First the client's own p50 going direct and through the gateway (alternating blocks); then `strace -ttt`
on the gateway process over ``--traced`` more requests, split per request into: the client's request read
→ the engine request written (front + pipeline + routing), the engine's answer read → the client's
response written (response path), and the wait for the engine in between. strace slows every system call,
so the split is for shares and for finding extra loop iterations (an ``epoll_wait`` on a path), not for
absolute µs. Needs ``strace`` and permission to attach to a child process.

    python benchmarks/gateway_c1_timeline.py [--floor] [--requests 400] [--traced 200]

``--probe`` times the path without strace: `c1probe/sitecustomize.py` on the gateway's PYTHONPATH stamps each
point (front read, request task, `Pipeline.start`, pick, engine request written, engine answer read, task
resumed, client response written) and the client stamps its send and receive on the same clock, so the split
includes the wake-ups between processes. ``--cpu`` stamps the gateway thread's CPU time instead: what each
segment costs in CPU whatever else runs on the machine (the robust measure on a busy one), plus the
bookkeeping after the response. ``--baseline-src DIR`` runs a second gateway from another source tree, the
two (and the engine alone) measured in alternating blocks of ``--requests`` for ``--rounds`` rounds.

    python benchmarks/gateway_c1_timeline.py --probe [--cpu] [--baseline-src DIR] [--requests 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway_common import start_fake_engines, start_inferstack_gateway, start_ready_file

KEY = "sk-bench-tenant"
BODY = json.dumps({"model": "bench-model", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "x" * 200}]}).encode()
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
           b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s" % (KEY.encode(), len(BODY), BODY))
_LINE = re.compile(r"\d+\s+([\d.]+) (\w+)\((\d+), \"(.{0,14})")
PROBE = Path(__file__).with_name("c1probe")
# (segment, from point, to point); "send" / "done" are the client's, the rest the probe's (`c1probe`)
SEGMENTS = [("client send -> gateway read (wake-up)", "send", "in"), ("front: read -> request task", "in", "task"),
            ("request task -> Pipeline.start", "task", "start0"), ("Pipeline.start", "start0", "start1"),
            ("start -> pick", "start1", "pick0"), ("pick (routing)", "pick0", "pick1"),
            ("pick -> engine request written", "pick1", "up_write"),
            ("engine: request written -> answer read", "up_write", "up_read"),
            ("answer read -> task resumed", "up_read", "resumed"),
            ("resumed -> client response written", "resumed", "out"),
            ("response written -> client has it", "out", "done")]
CPU_AFTER = ("after the response, to the next request (off the path)", "out", "next")


def sequential(url: str, n: int) -> list[float]:
    return [(t1 - t0) / 1e9 for t0, t1 in stamped(url, n)]


def stamped(url: str, n: int) -> list[tuple[int, int]]:
    """``n`` sequential requests on one connection: (sent, whole response in) per request, `perf_counter_ns`."""
    host, port = url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = []
        for _ in range(n):
            t0, buf = time.perf_counter_ns(), b""
            while True:
                if not buf:
                    s.sendall(REQUEST)
                buf += s.recv(65536)
                end = buf.find(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", buf[:end], re.I) if end >= 0 else None
                if length and len(buf) >= end + 4 + int(length.group(1)):
                    break
            out.append((t0, time.perf_counter_ns()))
    return out


def split(trace: str) -> dict[str, list[float]]:
    """Per request: (request read → engine write, engine wait, engine answer read → client write), seconds."""
    events = [(float(m[1]), m[2], m[3], m[4]) for m in map(_LINE.match, trace.splitlines()) if m]
    stages: dict[str, list[float]] = {"request path": [], "engine wait": [], "response path": []}
    for i, (t0, call, fd, data) in enumerate(events):
        if call != "read" or not data.startswith("POST /v1/chat"):
            continue
        sent = got = None
        for t, c, f, d in events[i + 1:i + 40]:
            if sent is None and c == "write" and d.startswith("POST /v1/chat"):
                sent, upstream = t, f
            elif sent is not None and got is None and c == "read" and f == upstream:
                got = t
            elif got is not None and c in ("write", "writev") and f == fd:
                stages["request path"].append(sent - t0)
                stages["engine wait"].append(got - sent)
                stages["response path"].append(t - got)
                break
    return stages


def gateway_config(engine_url: str) -> dict:
    return {"pools": {"bench": {"endpoints": [engine_url], "models": ["bench-model"]}},
            "keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "bench"}],
            "tenants": {"bench": {"rpm": 10_000_000, "tpm": 10_000_000_000}}}


def per_request(events: list[tuple[str, int]], client: list[tuple[int, int]], cpu: bool) -> list[dict[str, int]]:
    """Each request's first stamp of every point. Wall clock: the stamps inside a client request's (send,
    done); CPU clock (not comparable with the client's): stamps in order, a request starting at the first
    read after a response was written, ``next`` its successor's read."""
    if not cpu:
        rows, i = [], 0
        for t0, t1 in client:
            row = {"send": t0, "done": t1}
            while i < len(events) and events[i][1] <= t1:
                if events[i][1] >= t0:
                    row.setdefault(*events[i])
                i += 1
            rows.append(row)
        return rows
    rows, row = [], {}
    for point, t in events:
        if point == "in" and "out" in row:
            row["next"] = t
            rows.append(row)
            row = {}
        row.setdefault(point, t)
    return rows


def probe_report(name: str, rows: list[dict[str, int]], cpu: bool) -> None:
    # CPU: the client's stamps are on another clock, and the engine's time is the gateway's idle time
    segments = [s for s in SEGMENTS if not cpu or (s[1] not in ("send", "up_write") and s[2] != "done")]
    if cpu:
        segments.append(CPU_AFTER)
    print(f"\n{name}: {len(rows)} requests, {'gateway thread CPU' if cpu else 'wall clock'} per segment (µs)")
    on_path = 0.0
    for label, a, b in segments:
        v = sorted(r[b] - r[a] for r in rows if a in r and b in r)
        if not v:
            continue
        p50 = statistics.median(v) / 1e3
        on_path += p50 if (label, a, b) != CPU_AFTER else 0.0
        print(f"  {label:58s} p50 {p50:7.1f}  p10 {v[len(v) // 10] / 1e3:7.1f}  (n={len(v)})")
    print(f"  {'sum of the p50s on the path':58s} {on_path:7.1f}")


def probe(args: argparse.Namespace) -> None:
    """Alternating blocks: the engine alone, then each gateway; stamps as described in the module's doc."""
    engine = start_fake_engines(1, "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "8")[0]
    out = Path(tempfile.mkdtemp(prefix="c1-probe-"))
    trees = [("this tree", None)] + ([("baseline", args.baseline_src.resolve())] if args.baseline_src else [])
    gws = []
    try:
        for i, (_, src) in enumerate(trees):
            env = {"PYTHONPATH": str(PROBE), "INFERSTACK_C1_PROBE": str(out / f"gw{i}")}
            if args.cpu:
                env["INFERSTACK_C1_PROBE_CLOCK"] = "cpu"
            gws.append(start_inferstack_gateway(gateway_config(engine.url), src=src, extra_env=env))
        client: list[list[tuple[int, int]]] = [[] for _ in gws]
        direct: list[tuple[int, int]] = []
        for _ in range(args.rounds):
            direct += stamped(engine.url, args.requests)[20:]
            for i, gw in enumerate(gws):
                client[i] += stamped(gw.url, args.requests)[20:]  # the first 20 of a block warm up
    finally:
        for gw in gws:
            gw.stop()
        engine.stop()
    p50s = [f"{name} {statistics.median(b - a for a, b in c) / 1e3:.0f} µs"
            for (name, _), c in zip(trees, client, strict=True)]
    print(f"client p50: direct {statistics.median(b - a for a, b in direct) / 1e3:.0f} µs, " + ", ".join(p50s))
    for i, (name, _) in enumerate(trees):
        events = sorted(((line.split()[0], int(line.split()[1])) for f in glob.glob(f"{out}/gw{i}.*")
                         for line in Path(f).read_text().splitlines()), key=lambda e: e[1])
        probe_report(name, per_request(events, sorted(client[i]), args.cpu), args.cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floor", action="store_true", help="trace the bare proxy instead of our gateway")
    ap.add_argument("--requests", type=int, default=400, help="untraced sequential requests per block")
    ap.add_argument("--traced", type=int, default=200, help="requests under strace")
    ap.add_argument("--probe", action="store_true", help="stamp points in the gateway instead of strace")
    ap.add_argument("--cpu", action="store_true", help="--probe: the gateway thread's CPU time per segment")
    ap.add_argument("--baseline-src", type=Path, default=None, help="--probe: also a gateway from this src/")
    ap.add_argument("--rounds", type=int, default=3, help="--probe: alternating blocks per target")
    args = ap.parse_args()
    if args.probe:
        probe(args)
        return
    engine = start_fake_engines(1, "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "8")[0]
    if args.floor:
        gw = start_ready_file("floor", [sys.executable, str(Path(__file__).with_name("gateway_floor.py")),
                                        "--upstream", engine.url, "--port", "0"])
    else:
        gw = start_inferstack_gateway(gateway_config(engine.url))
    trace_file = Path(tempfile.mkdtemp(prefix="c1-timeline-")) / "strace.txt"
    try:
        p50 = {"direct": [], "gateway": []}
        for _ in range(2):
            for name, url in (("direct", engine.url), ("gateway", gw.url)):
                sequential(url, 50)  # warm-up
                p50[name].append(statistics.median(sequential(url, args.requests)) * 1e3)
        print("client p50 ms: " + ", ".join(f"{k} {' / '.join(f'{v:.3f}' for v in vs)}" for k, vs in p50.items()))
        tracer = subprocess.Popen(["strace", "-f", "-ttt", "-p", str(gw.proc.pid), "-o", str(trace_file),
                                   "-e", "trace=read,write,writev,epoll_wait,epoll_pwait"], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        sequential(gw.url, args.traced)
        tracer.terminate()
        tracer.wait(10)
    finally:
        gw.stop()
        engine.stop()
    for name, v in split(trace_file.read_text()).items():
        print(f"{name}: p50 {statistics.median(v) * 1e6:.0f} µs, p10 {sorted(v)[len(v) // 10] * 1e6:.0f} µs "
              f"(n={len(v)}, under strace)")


if __name__ == "__main__":
    main()
