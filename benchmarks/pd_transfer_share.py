"""Share of the decode engine's TTFT spent moving KV, per PD transport (real CPU engines).

For each transport: a prefill and a decode `inferstack engine serve` (SmolLM2-135M, one thread
each), the gateway's PD flow played by hand (prefill leg with `max_tokens: 1`, then the decode leg
with the returned `kv_transfer_params`), ``--requests`` prompts of ~``--tokens`` tokens after one
warm-up. From the decode engine's /metrics: the time its PD connector spent getting the KV
(`inferstack_kv_connector_fetch_seconds` + `..._load_seconds`, connector="pd") over the sum of its
`vllm:time_to_first_token_seconds`.

    PYTHONPATH=src python benchmarks/pd_transfer_share.py --transports nixl,shm --requests 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from inferstack.telemetry.promtext import parse
from support.procs import start_inferstack

SUMS = {"fetch": ("inferstack_kv_connector_fetch_seconds_sum", {"connector": "pd"}),
        "load": ("inferstack_kv_connector_load_seconds_sum", {"connector": "pd"}),
        "ttft": ("vllm:time_to_first_token_seconds_sum", {}),
        "bytes": ("inferstack_kv_transfer_bytes_total", {"direction": "recv"})}


def sums(url: str) -> dict[str, float]:
    scrape = parse(httpx.get(f"{url}/metrics", timeout=30).text, t=0.0)
    return {key: sum(scrape.select(name, **match).values()) for key, (name, match) in SUMS.items()}


def prompt(k: int, tokens: int) -> str:
    return " ".join(f"Doc {k} line {i}: sensor {i % 17} reported value {i * 3 % 101} at hour {i % 24}."
                    for i in range(tokens // 18))


def run(transport: str, args: argparse.Namespace) -> dict[str, float]:
    base = ["engine", "serve", "--model", "smollm2-135m", "--dtype", "float32", "--threads", "1",
            "--kv-transport", transport]
    prefill = start_inferstack([*base, "--role", "prefill"])
    decode = start_inferstack([*base, "--role", "decode", "--kv-transfer-peers", "127.0.0.1"])
    try:
        before: dict[str, float] = {}
        for k in range(args.requests + 1):               # request 0 warms connections and metadata
            text = prompt(k, args.tokens)
            r = httpx.post(f"{prefill.url}/v1/completions", timeout=900, json={
                "prompt": text, "max_tokens": 1, "temperature": 0, "kv_transfer_params": {"do_remote_decode": True}})
            r.raise_for_status()
            params = r.json()["kv_transfer_params"]
            r = httpx.post(f"{decode.url}/v1/completions", timeout=900, json={
                "prompt": text, "max_tokens": 4, "temperature": 0, "kv_transfer_params": params})
            r.raise_for_status()
            if k == 0:
                before = sums(decode.url)
        after = sums(decode.url)
        return {key: after[key] - before[key] for key in SUMS}
    finally:
        prefill.stop()
        decode.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default="nixl,shm")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1000)
    args = ap.parse_args()
    print("| transport | KV moved | fetch + load | decode TTFT (sum) | share of TTFT |")
    print("|---|---:|---:|---:|---:|")
    for transport in args.transports.split(","):
        d = run(transport, args)
        moved = d["fetch"] + d["load"]
        print(f"| {transport} | {d['bytes'] / 1e6:.0f} MB | {moved * 1e3:.0f} ms | {d['ttft'] * 1e3:.0f} ms "
              f"| {moved / d['ttft'] * 100:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
