"""The gateway's server and proxy glue around the pipeline, part by part (`gateway_parts.py` times the pipeline's).

Hot loops in one process, CPU time (`time.process_time`), best of ``--reps`` passes: a proxied reply's head
(four headers checked per response against two plus `http_cycle.fixed_headers`), a streamed chunk on our front
(`Cycle.send` with an ASGI message against `Cycle.write_now`), and a metrics scrape's parse
(`datalayer.parse_engine_metrics` of a fake engine's 6 lines and of a vLLM-like 426-line text, without and with
the endpoint's label cache). ``--idle SECONDS`` also runs the gateway idle in front of two fake engines and
reads its CPU from ``/proc/PID/schedstat`` (the 50 ms scrapes are all it does), once per source tree of
``--src`` (comma list, interleaved, three readings each).

    python benchmarks/gateway_glue_parts.py [--reps 5] [--idle 4 --src /tmp/base/src,src]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import uvloop
import yaml
from gateway_parts import best_us

from inferstack.gateway.datalayer import parse_engine_metrics
from inferstack.protocol.http_cycle import Cycle, fixed_headers

CHUNK = b'data: {"id":"x","choices":[{"delta":{"content":"tok"}}]}\n\n'
ENDPOINT, CTYPE, RID = b"127.0.0.1:8001", b"application/json", b"0123456789abcdef0123456789abcdef"
SERVED = b"x-gateway-destination-endpoint-served"


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _proto() -> types.SimpleNamespace:
    return types.SimpleNamespace(default_head=b"date: Mon, 07 Dec 2026 20:00:00 GMT\r\n", header_names={},
                                 header_values=set(), write_paused=False, transport=_Transport(), loop=None)


def reply_heads(n: int, reps: int) -> None:
    cycle = Cycle(_proto(), None, [], True, False, None)  # type: ignore[arg-type]
    fixed = {(ENDPOINT, CTYPE): fixed_headers(((b"content-type", CTYPE), (SERVED, ENDPOINT)))}

    def checked() -> None:
        cycle.chunked = False
        cycle._encode_head(200, [(b"content-type", CTYPE), (b"content-length", b"%d" % 300), (b"x-request-id", RID),
                                 (SERVED, ENDPOINT)])

    def with_fixed() -> None:
        cycle.chunked = False
        cycle._encode_head(200, [(b"content-length", b"%d" % 300), (b"x-request-id", RID)],
                           fixed[(ENDPOINT, CTYPE)].lines)

    print(f"reply head, 4 headers checked:        {best_us(checked, n, reps):6.2f} us")
    print(f"reply head, 2 checked + fixed lines:  {best_us(with_fixed, n, reps):6.2f} us")


async def _chunks(n: int, reps: int) -> tuple[float, float]:
    proto = _proto()
    proto.loop = asyncio.get_running_loop()
    cycle = Cycle(proto, None, [], True, False, None)  # type: ignore[arg-type]
    await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/x")]})
    sent = written = float("inf")
    for _ in range(reps):
        t = time.process_time()
        for _ in range(n):
            await cycle.send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        sent = min(sent, time.process_time() - t)
        t = time.process_time()
        for _ in range(n):
            cycle.write_now(CHUNK)
        written = min(written, time.process_time() - t)
    return sent / n * 1e6, written / n * 1e6


def engine_texts() -> dict[str, str]:
    m = "bench-model"
    fake = (f'vllm:num_requests_running{{model_name="{m}"}} 3\nvllm:num_requests_waiting{{model_name="{m}"}} 0\n'
            f'vllm:kv_cache_usage_perc{{model_name="{m}"}} 0.1\ninferstack:max_num_seqs{{model_name="{m}"}} 256\n'
            f'vllm:prefix_cache_hits_total{{model_name="{m}"}} 100\n'
            f'vllm:prefix_cache_queries_total{{model_name="{m}"}} 200\n')
    lines = [fake]
    for i in range(60):  # a real engine's exposition: many families the gateway does not read
        lines.append(f"# HELP vllm:other_{i} x\n# TYPE vllm:other_{i} histogram\n")
        lines += [f'vllm:other_{i}_bucket{{model_name="{m}",le="{b}"}} {i}\n' for b in (0.1, 0.5, 1, 5, "+Inf")]
    real = "".join(lines)
    return {"fake engine, 6 lines": fake, f"vLLM-like, {real.count(chr(10))} lines": real}


def scrape_parse(n: int, reps: int) -> None:
    for name, text in engine_texts().items():
        cache: dict = {}
        bare = best_us(lambda t=text: parse_engine_metrics(t), n, reps)
        cached = best_us(lambda t=text, c=cache: parse_engine_metrics(t, c), n, reps)
        print(f"scrape parse, {name}: {bare:6.1f} us, with the label cache {cached:6.1f} us")


def idle_cpu(trees: list[str], seconds: float) -> None:
    """The idle gateway's CPU a second (schedstat, every thread) for each tree, readings interleaved."""
    from gateway_common import start_fake_engines, start_ready_file

    engines = start_fake_engines(2, "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "8")
    gateways = []
    try:
        cfg = {"pools": {"bench": {"endpoints": [e.url for e in engines], "models": ["bench-model"]}}}
        for tree in trees:
            path = Path(tempfile.mkdtemp(prefix="gwglue-")) / "inferstack.yaml"
            path.write_text(yaml.safe_dump(cfg))
            gateways.append(start_ready_file("gwglue", [sys.executable, "-m", "inferstack", "gateway", "serve",
                                                        "--config", str(path), "--port", "0"],
                                             extra_env={"PYTHONPATH": str(Path(tree).resolve())}))
        time.sleep(1.0)
        readings: list[list[float]] = [[] for _ in trees]
        for _ in range(3):
            for i, gw in enumerate(gateways):
                before, t0 = _schedstat_ns(gw.proc.pid), time.monotonic()
                time.sleep(seconds)
                readings[i].append((_schedstat_ns(gw.proc.pid) - before) / 1e6 / (time.monotonic() - t0))
        for tree, r in zip(trees, readings, strict=True):
            print(f"idle gateway, {tree}: {statistics.median(r):5.2f} ms CPU/s (readings "
                  f"{', '.join(f'{x:.2f}' for x in r)})")
    finally:
        for p in (*gateways, *engines):
            p.stop()


def _schedstat_ns(pid: int) -> int:
    return sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0])
               for t in os.listdir(f"/proc/{pid}/task"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--idle", type=float, default=0.0, help="seconds per idle CPU reading (0: none)")
    ap.add_argument("--src", default="src", help="comma list of source trees for --idle")
    args = ap.parse_args()
    reply_heads(200_000, args.reps)
    sent, written = uvloop.run(_chunks(200_000, args.reps))
    print(f"stream chunk, await send(message):   {sent:6.2f} us")
    print(f"stream chunk, write_now:              {written:6.2f} us")
    scrape_parse(20_000, args.reps)
    if args.idle:
        idle_cpu(args.src.split(","), args.idle)


if __name__ == "__main__":
    main()
