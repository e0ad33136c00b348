"""ITL of running decodes while long prefills arrive: colocated vs prefill/decode disaggregated.

Two fleets of two single-thread engines (SmolLM2-135M, float32), each engine pinned to its own core
with `os.sched_setaffinity`, behind `inferstack gateway serve`:

* colocated: two `--role both` engines, least-load routing;
* PD: one `--role prefill` + one `--role decode` engine, a PD pool (short prompts stay on the
  decode engine, long ones are prefilled remotely and their KV pulled);
* chunked (``--fleets ...,chunked``): colocated engines with a small step budget
  (``--chunk-tokens``, Sarathi-style chunked prefill), the other answer to prefill stalls.

Load (driven with the `inferstack bench` client library): ``--decodes`` closed-loop streams with a
short prompt and ``--output-tokens`` tokens each (the "running decodes"), plus one long prompt
(``--prompt-words``) every ``--prefill-every`` seconds. Reported: inter-token latency of the
running decodes (p50/p90/p99/max) over the whole run and over the gaps that overlap a long prompt's
prefill (its send to its first token), TTFT of the long prompts, and the PD / colocated ratios.

    PYTHONPATH=src python benchmarks/pd_itl.py --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from inferstack.bench.client import Client, ClientOptions, build_body
from inferstack.bench.records import RequestRecord
from inferstack.bench.workloads import RequestSpec

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


class Proc:
    def __init__(self, args: list[str], core: int | None, name: str):
        tmp = Path(tempfile.mkdtemp(prefix=f"pd-itl-{name}-"))
        self.ready = tmp / "ready.json"
        self.log = tmp / "log"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
        pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
        self.proc = subprocess.Popen([sys.executable, "-m", "inferstack", *args, "--port", "0",
                                      "--ready-file", str(self.ready)], stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, env=env, preexec_fn=pin)

    def wait(self, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if self.ready.exists() and self.ready.stat().st_size:
                return json.loads(self.ready.read_text().splitlines()[0])["urls"][0]
            time.sleep(0.1)
        raise TimeoutError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def engine(role: str, core: int, *extra: str) -> Proc:
    return Proc(["engine", "serve", "--model", MODEL, "--threads", "1", "--dtype", "float32",
                 "--max-model-len", "2048", "--kv-cache-bytes", "128MiB", "--role", role, *extra], core,
                f"{role}{core}")


def gateway(endpoints: list[dict], pd: dict | None) -> Proc:
    pool: dict = {"endpoints": endpoints, "models": [MODEL], "routing": "least-load"}
    if pd is not None:
        pool["pd"] = pd
    path = Path(tempfile.mkdtemp(prefix="pd-itl-gw-")) / "inferstack.yaml"
    path.write_text(yaml.safe_dump({"pools": {"p": pool}}))
    return Proc(["gateway", "serve", "--config", str(path)], None, "gw")


def long_text(i: int, words: int) -> str:
    # distinct from the first word on, so no prefix is ever cached
    return " ".join(f"r{i}w{j}" if j % 8 == 0 else "archive" for j in range(words))


async def drive(url: str, args: argparse.Namespace) -> tuple[list[RequestRecord], list[RequestRecord]]:
    opts = ClientOptions(stream=True, ignore_eos=True)
    decodes: list[RequestRecord] = []
    prefills: list[RequestRecord] = []
    async with Client([url], MODEL, opts) as client:
        clock0 = time.perf_counter()
        stop_at = args.warmup + args.duration
        counter = iter(range(10**9))

        async def decode_loop(k: int) -> None:
            while time.perf_counter() - clock0 < stop_at:
                spec = RequestSpec([("user", f"Stream {k}: count slowly from one to one hundred.")], 10,
                                   args.output_tokens)
                rec = RequestRecord(next(counter), k, 0, time.perf_counter() - clock0)
                await client.send(build_body(spec, MODEL, opts), rec, clock0)
                rec.included = rec.sent >= args.warmup
                decodes.append(rec)

        async def prefill_loop() -> None:
            i = 0
            tasks = []
            while time.perf_counter() - clock0 < stop_at:
                await asyncio.sleep(args.prefill_every)
                spec = RequestSpec([("user", long_text(i, args.prompt_words))], args.prompt_words, 4)
                rec = RequestRecord(next(counter), 10_000 + i, 0, time.perf_counter() - clock0)
                rec.included = rec.scheduled >= args.warmup
                prefills.append(rec)
                tasks.append(asyncio.create_task(client.send(build_body(spec, MODEL, opts), rec, clock0)))
                i += 1
            # long prompts still queued at the end are not waited for: they would only add tail time
            _, pending = await asyncio.wait(tasks, timeout=args.grace) if tasks else (None, [])
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        await asyncio.gather(prefill_loop(), *(decode_loop(k) for k in range(args.decodes)))
    return decodes, prefills


def _quantiles(gaps: list[float]) -> dict:
    g = np.array(gaps) * 1000 if gaps else np.zeros(1)
    return ({q: round(float(np.percentile(g, p)), 1) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
            | {"max": round(float(g.max()), 1), "n": len(gaps)})


def summarize(decodes: list[RequestRecord], prefills: list[RequestRecord], window: tuple[float, float]) -> dict:
    # "while long prefills arrive": from a long prompt's send to its first token
    busy = [(r.sent, r.sent + r.ttft) for r in prefills if r.ttft is not None]
    gaps, during = [], []
    for r in decodes:
        if r.ok:
            for a, b in itertools.pairwise(r.chunk_times):
                if window[0] <= a <= window[1]:
                    gaps.append(b - a)
                    if any(a < end and b > start for start, end in busy):
                        during.append(b - a)
    ttfts = np.array([r.ttft for r in prefills if r.included and r.ttft is not None]) * 1000
    return {
        "itl_ms": _quantiles(gaps),
        "itl_ms_during_long_prefills": _quantiles(during),
        "long_ttft_ms_p50": round(float(np.median(ttfts)), 1) if len(ttfts) else None,
        "long_prompt_tokens": max((r.prompt_tokens or 0 for r in prefills), default=0),
        "errors": sum(not r.ok for r in decodes + prefills),
        "decode_requests": sum(r.ok and r.included for r in decodes),
        "long_requests": sum(r.ok and r.included for r in prefills),
    }


def run_fleet(kind: str, args: argparse.Namespace) -> dict:
    if kind == "colocated":
        engines = [engine("both", 0), engine("both", 1)]
    elif kind == "chunked":
        budget = ["--max-num-batched-tokens", str(args.chunk_tokens)]
        engines = [engine("both", 0, *budget), engine("both", 1, *budget)]
    else:
        engines = [engine("prefill", 0), engine("decode", 1, "--kv-transfer-peers", "127.0.0.1")]
    gw = None
    try:
        urls = [e.wait() for e in engines]
        if kind != "pd":
            gw = gateway([{"url": u} for u in urls], None)
        else:
            gw = gateway([{"url": urls[0], "role": "prefill"}, {"url": urls[1], "role": "decode"}],
                         {"threshold_tokens": args.threshold})
        url = gw.wait()
        decodes, prefills = asyncio.run(drive(url, args))
        return summarize(decodes, prefills, (args.warmup, args.warmup + args.duration))
    finally:
        for p in [gw, *engines]:
            if p is not None:
                p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=40.0, help="measured seconds per fleet")
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--decodes", type=int, default=4, help="concurrent running decode streams")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=300, help="long prompt length (~1.3 tokens/word)")
    ap.add_argument("--prefill-every", type=float, default=6.0, help="seconds between long prompts")
    ap.add_argument("--threshold", type=int, default=256, help="PD decider threshold (tokens)")
    ap.add_argument("--grace", type=float, default=15.0, help="seconds to wait for long prompts after the run")
    ap.add_argument("--fleets", default="colocated,pd",
                    help="comma-separated: colocated, pd, chunked (colocated with a small step budget)")
    ap.add_argument("--chunk-tokens", type=int, default=64,
                    help="chunked fleet: --max-num-batched-tokens of its engines (chunked prefill)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 cores (one per engine)")
    fleets = args.fleets.split(",")
    if unknown := set(fleets) - {"colocated", "pd", "chunked"}:
        sys.exit(f"unknown fleets {sorted(unknown)}: choose from colocated, pd, chunked")
    results: dict = {kind: run_fleet(kind, args) for kind in fleets}
    if "colocated" in results:
        for kind in (k for k in fleets if k != "colocated"):
            for key in ("itl_ms", "itl_ms_during_long_prefills"):
                base = results["colocated"][key]["p99"]     # 0 when no gap overlapped a long prefill
                results[f"{kind}_over_colocated_{key}_p99"] = (
                    round(results[kind][key]["p99"] / base, 3) if base else None)
    results["load1_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
