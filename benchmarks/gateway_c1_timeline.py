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
"""

from __future__ import annotations

import argparse
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


def sequential(url: str, n: int) -> list[float]:
    host, port = url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out = []
        for _ in range(n):
            t0, buf = time.perf_counter(), b""
            while True:
                if not buf:
                    s.sendall(REQUEST)
                buf += s.recv(65536)
                end = buf.find(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", buf[:end], re.I) if end >= 0 else None
                if length and len(buf) >= end + 4 + int(length.group(1)):
                    break
            out.append(time.perf_counter() - t0)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floor", action="store_true", help="trace the bare proxy instead of our gateway")
    ap.add_argument("--requests", type=int, default=400, help="untraced sequential requests per block")
    ap.add_argument("--traced", type=int, default=200, help="requests under strace")
    args = ap.parse_args()
    engine = start_fake_engines(1, "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "8")[0]
    if args.floor:
        gw = start_ready_file("floor", [sys.executable, str(Path(__file__).with_name("gateway_floor.py")),
                                        "--upstream", engine.url, "--port", "0"])
    else:
        gw = start_inferstack_gateway({
            "pools": {"bench": {"endpoints": [engine.url], "models": ["bench-model"]}},
            "keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "bench"}],
            "tenants": {"bench": {"rpm": 10_000_000, "tpm": 10_000_000_000}}})
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
