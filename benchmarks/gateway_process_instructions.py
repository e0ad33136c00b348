"""CPU instructions per request of the whole gateway process (front, pipeline, proxy, upstream client, event loop),
counted by valgrind's callgrind: robust on a busy machine, where CPU time per request swings by ±20 %.

`gateway_stages.py --instructions` counts the pipeline's stages in process; this counts everything the gateway
process executes for a request over real sockets, as `gateway_overhead.py` loads it (2 instant fake engines, keys,
RPM/TPM limits, metrics, flow control on; one 200-character chat turn, not streamed; concurrency 64). For each
source tree the gateway runs twice under callgrind, serving ``--requests`` and then six times as many after the
same warm-up; the difference of the two totals over the extra requests cancels start-up, imports and shut-down.
The endpoints' metrics are scraped every ``--scrape-s`` seconds (default 1 s, not the 50 ms default: under
callgrind a run lasts minutes of wall time, and background scrapes would count per second, not per request).
User-space instructions only (the kernel's share of the socket calls is not counted).

    python benchmarks/gateway_process_instructions.py --src /tmp/base/src,src [--requests 300] [--routing default]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import orjson
import yaml
from gateway_common import start_fake_engines, start_ready_file, throughput

KEY = "sk-bench-tenant"
MODEL = "bench-model"
WARMUP = 200


def gateway_config(workers: list[str], routing: str, scrape_s: float) -> dict:
    return {"pools": {"bench": {"endpoints": workers, "models": [MODEL], "routing": routing}},
            "keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "bench"}],
            "tenants": {"bench": {"rpm": 10_000_000, "tpm": 10_000_000_000}},
            "gateway": {"scrape_interval_s": scrape_s}}


def counted_run(tree: Path, config: dict, requests: int, concurrency: int) -> int:
    """Instructions the gateway process executed from start to exit, serving WARMUP + ``requests`` requests."""
    path = Path(tempfile.mkdtemp(prefix="gwinstr-cfg-")) / "inferstack.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m", "inferstack",
           "gateway", "serve", "--config", str(path), "--port", "0"]
    gw = start_ready_file("gwinstr", cmd, timeout=900, extra_env={"PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"})
    try:
        body = orjson.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 200}]})
        url, headers = gw.url + "/v1/chat/completions", {"authorization": f"Bearer {KEY}"}
        asyncio.run(throughput(url, body, WARMUP, concurrency, headers))
        asyncio.run(throughput(url, body, requests, concurrency, headers))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gw.proc.pid, signal.SIGTERM)
        gw.proc.wait(600)
    found = re.search(r"refs:\s+([\d,]+)", gw.log.read_text())
    if found is None:
        raise RuntimeError(f"no callgrind summary in {gw.log}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="comma list of source trees (a checkout's root: its src/)")
    ap.add_argument("--requests", type=int, default=300, help="requests of the short run (the long one: 6x)")
    ap.add_argument("--routing", default="default")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--scrape-s", type=float, default=1.0, help="gateway.scrape_interval_s during the runs")
    args = ap.parse_args()
    engines = start_fake_engines(2, "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "8")
    try:
        config = gateway_config([e.url for e in engines], args.routing, args.scrape_s)
        for src in args.src.split(","):
            tree = Path(src).resolve()
            tree = tree / "src" if (tree / "src" / "inferstack").is_dir() else tree
            short, long = (counted_run(tree, config, n, args.concurrency) for n in (args.requests, 6 * args.requests))
            print(f"{src} ({args.routing}, c{args.concurrency}): {(long - short) / (5 * args.requests):,.0f} "
                  "instructions per request", flush=True)
    finally:
        for e in engines:
            e.stop()


if __name__ == "__main__":
    main()
