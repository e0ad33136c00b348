"""Inter-token latency of running streams while long prompts arrive: colocated vs prefill/decode.

Colocated: one engine (`--role both`) serves short streaming chats and long-prompt requests; every
long prefill shares engine steps with the streams and stalls them. PD: a prefill engine computes
the long prompts (max_tokens 1, vLLM's prefill leg), a decode engine serves the streams and
continues each long request from its pulled KV (computing under one block of it). The script
plays the gateway's part of the PD flow itself. Reports the streams' ITL p50/p99 and the long
requests' TTFT in both setups, same workload, same machine, one after the other.

    PYTHONPATH=src python benchmarks/kv_pd_itl.py --long-tokens 1500 --streams 3
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.procs import start_inferstack


def long_prompt(k: int, tokens: int) -> str:
    return " ".join(f"Doc {k} line {i}: sensor {i % 17} reported value {i * 3 % 101} at hour {i % 24}."
                    for i in range(tokens // 18))


async def stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[list[float], float, dict | None]:
    """POST a streaming completion; return chunk arrival times, TTFT and the last JSON chunk."""
    t0 = time.perf_counter()
    times: list[float] = []
    last = None
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
                last = json.loads(line[6:])
    return times, (times[0] - t0) if times else float("nan"), last


async def workload(stream_url: str, long_fn, args) -> tuple[list[float], list[float]]:
    async with httpx.AsyncClient(timeout=900) as client:
        async def short(i: int) -> list[float]:
            gaps: list[float] = []
            for turn in range(args.turns):
                body = {"prompt": f"Write a short story number {i}-{turn} about a lighthouse.",
                        "max_tokens": args.stream_tokens, "temperature": 0, "ignore_eos": True}
                times, _, _ = await stream(client, stream_url, body)
                gaps += [b - a for a, b in itertools.pairwise(times)]
            return gaps

        async def longs() -> list[float]:
            ttfts = []
            for k in range(args.long_requests):
                await asyncio.sleep(args.long_every)
                ttfts.append(await long_fn(client, long_prompt(k, args.long_tokens)))
            return ttfts

        results = await asyncio.gather(*(short(i) for i in range(args.streams)), longs())
    gaps = [g for r in results[:-1] for g in r]
    return gaps, results[-1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-tokens", type=int, default=1500)
    ap.add_argument("--long-requests", type=int, default=3)
    ap.add_argument("--long-every", type=float, default=2.0, help="seconds between long requests")
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--stream-tokens", type=int, default=48)
    args = ap.parse_args()
    base = ["engine", "serve", "--model", "smollm2-135m", "--dtype", "float32", "--threads", "1"]
    report = {}

    colo = start_inferstack(base)
    try:
        async def colo_long(client, prompt):
            _, ttft, _ = await stream(client, colo.url, {"prompt": prompt, "max_tokens": 8, "temperature": 0})
            return ttft
        report["colocated"] = asyncio.run(workload(colo.url, colo_long, args))
    finally:
        colo.stop()

    prefill = start_inferstack([*base, "--role", "prefill"])
    decode = start_inferstack([*base, "--role", "decode", "--kv-transfer-peers", "127.0.0.1"])
    try:
        async def pd_long(client, prompt):
            t0 = time.perf_counter()
            r = await client.post(f"{prefill.url}/v1/completions", json={
                "prompt": prompt, "max_tokens": 1, "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}})
            r.raise_for_status()
            params = r.json()["kv_transfer_params"]
            times, _, _ = await stream(client, decode.url, {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                            "kv_transfer_params": params})
            return times[0] - t0
        report["pd (1P1D)"] = asyncio.run(workload(decode.url, pd_long, args))
        metrics = httpx.get(f"{decode.url}/metrics").text
        transfer = [ln for ln in metrics.splitlines() if ln.startswith(("inferstack_kv_transfer_bytes_total",
                                                                        "inferstack_kv_transfer_seconds_total",
                                                                        "vllm:external_prefix_cache_hits_total"))]
    finally:
        prefill.stop()
        decode.stop()

    print(f"\n{args.streams} streams x {args.turns} turns x {args.stream_tokens} tokens; "
          f"{args.long_requests} long prompts of ~{args.long_tokens} tokens every {args.long_every}s")
    print(f"{'setup':12s} {'ITL p50 ms':>11s} {'ITL p99 ms':>11s} {'ITL max ms':>11s} {'long TTFT s (each)':>24s}")
    for name, (gaps, ttfts) in report.items():
        print(f"{name:12s} {pct(gaps, .5) * 1e3:11.1f} {pct(gaps, .99) * 1e3:11.1f} {max(gaps) * 1e3:11.1f} "
              f"{' '.join(f'{t:.2f}' for t in ttfts):>24s}")
    print("\n".join(transfer))


if __name__ == "__main__":
    main()
