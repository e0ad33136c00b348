"""Overload: the README stack (`inferstack up`, defaults) driven at 1x, 2x, 4x and 8x its capacity
with the README's `inferstack bench` workload; goodput, how fast shed requests are refused, and what
is still running at the engines after the client stops.

Goodput here = requests completed per second of sending (optionally only those meeting --slo); a
well-behaved stack serves at capacity and refuses the excess quickly, so goodput at 8x stays near
goodput at 1x. With requests that run for tens of seconds that count includes the backlog finished
during the drain (up to what the engines and the queue hold), so `steady_rps` also counts the
completions that ended in the last two thirds of the sending window, per second: the rate served
while loaded, comparable with the calibrated capacity. Shed = HTTP 429; refusal time = send to
429; `late_429` = refusals after 1 s; `engine_waiting_*` = the engines' own queues (summed), sampled
every 0.5 s while the rate runs: what waits where the gateway can neither refuse nor reorder it.

Before the measured rates the stack is warmed as a running one is: every group's system prompt (the
workload's own prompts, same seed) is sent once through the gateway, one request per engine at a
time, so the groups spread over the engines' prefix caches and the router knows where each is (on a
cold 1-thread CPU engine one 2,048-token prefill alone takes tens of seconds, minutes on a busy
machine, and the previous time-boxed closed-loop warm-up left groups cold, so its calibration measured
those prefills: 0.13 req/s). `--warmup` caps its seconds.

    PYTHONPATH=src python benchmarks/gateway_overload.py [--capacity 1.0|auto] [--factors 1,2,4,8] \
        [--duration 30] [--workload shared-prefix:groups=4,system=256,question=32,output=32] [--up-args ...]

`--capacity auto` measures the stack's service rate for this workload in the same run (a busy machine
gives CPU engines less): after the warm-up, a closed loop of as many clients as the engines run at
once (the sum of their `inferstack:max_num_seqs`, or --calibrate-concurrency) for
--calibrate-duration seconds; capacity = requests that finished in its last two thirds / that time
(the first third fills the pipeline; counting completions by when they end keeps the backlog out).
It uses the measured runs' seed, so its system prompts are the cached ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from inferstack.bench.workloads import RequestSpec, parse_workload
from inferstack.telemetry import promtext

ROOT = Path(__file__).resolve().parents[1]

README_WORKLOAD = "shared-prefix:groups=4,system=256,question=32,output=32"  # README.md's `bench run` line


def start_stack(tmp: Path, up_args: list[str]) -> tuple[subprocess.Popen, dict]:
    ready = tmp / "up.ready.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "inferstack", "up", "--port", "0", "--ready-file", str(ready),
                             "--log-dir", str(tmp / "logs"), *up_args],
                            stdout=(tmp / "up.log").open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"inferstack up failed; see {tmp / 'up.log'}")
        time.sleep(0.2)
    return proc, json.loads(ready.read_text().splitlines()[0])


def engine_urls(log_dir: Path) -> list[str]:
    # one ready file per engine process; an emulated fleet (`--emulate`) lists all its engines in one
    ready = [json.loads(p.read_text().splitlines()[0]) for p in sorted(log_dir.glob("engine-*.ready.json"))]
    return [u for r in ready for u in r["urls"]]


def engine_load(urls: list[str]) -> float:
    """Requests running + waiting over the engines, from their /metrics."""
    total = 0.0
    for u in urls:
        for line in httpx.get(u + "/metrics", timeout=10).text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                total += float(line.rsplit(" ", 1)[1])
    return total


def settle_time(urls: list[str], limit_s: float = 60.0) -> float:
    """Seconds after the client stopped until the engines hold no request (limit_s if never)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if engine_load(urls) == 0:
            return time.monotonic() - t0
        time.sleep(0.25)
    return limit_s


def engine_gauge(urls: list[str], name: str) -> float:
    """The sum of one gauge over the engines' /metrics."""
    scrapes = [promtext.parse(httpx.get(u + "/metrics", timeout=10).text, 0.0, names={name}) for u in urls]
    return sum(v for s in scrapes for v in s.select(name).values())


def group_prompts(workload: str, seed: int) -> list[RequestSpec]:
    """One request of each group of the workload, with the prompts the measured runs send."""
    first: dict[str | None, RequestSpec] = {}
    for n, unit in enumerate(parse_workload(workload).units(seed)):
        for spec in (s for stage in unit.stages for s in stage):
            first.setdefault(spec.group, spec)
        if n > 10_000 or None in first:  # a workload without groups: its first request is all there is
            break
    return list(first.values())


def warm_up(gateway: str, model: str, clients: int, args: argparse.Namespace) -> int:
    """Each group's prompt once through the gateway, ``clients`` at a time (one per engine), so the
    router spreads the groups and remembers where each prefix is cached; returns how many finished."""
    specs = group_prompts(args.workload, 1)
    deadline = time.monotonic() + args.warmup

    def one(spec: RequestSpec) -> bool:
        if time.monotonic() > deadline:
            return False
        body = {"model": model, "max_tokens": 1, "messages": [{"role": r, "content": t} for r, t in spec.messages]}
        try:
            return httpx.post(gateway + "/v1/chat/completions", json=body,
                              timeout=max(1.0, deadline - time.monotonic())).status_code == 200
        except httpx.TimeoutException:
            return False

    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(one, specs))


def calibrate(gateway: str, concurrency: int, args: argparse.Namespace, out: Path) -> float:
    """Requests/s the stack completes under a closed loop at the engines' concurrency (module docstring)."""
    cmd = [sys.executable, "-m", "inferstack", "bench", "run", "--target", gateway, "--workload", args.workload,
           "--concurrency", str(concurrency), "--duration", str(args.calibrate_duration), "--seed", "1",
           "--drain-timeout", "1", "--no-progress", "--no-plots", "--out", str(out)]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    reqs = json.loads((out / "results.json").read_text())["requests"]
    start = args.calibrate_duration / 3
    done = [r for r in reqs if r["status"] == "ok" and start <= r["end_s"] <= args.calibrate_duration]
    return len(done) / (args.calibrate_duration - start)


def sample_engine_waiting(urls: list[str], stop: threading.Event, out: list[float]) -> None:
    """`vllm:num_requests_waiting` summed over the engines, every 0.5 s until ``stop``: what waits where
    the gateway can neither refuse nor reorder it."""
    while not stop.wait(0.5):
        with contextlib.suppress(httpx.HTTPError):
            out.append(engine_gauge(urls, "vllm:num_requests_waiting"))


def run_rate(gateway: str, urls: list[str], rate: float, args: argparse.Namespace, out: Path) -> dict:
    waiting: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_engine_waiting, args=(urls, stop, waiting), daemon=True)
    sampler.start()
    cmd = [sys.executable, "-m", "inferstack", "bench", "run", "--target", gateway, "--workload", args.workload,
           "--rate", str(rate), "--duration", str(args.duration), "--seed", "1", "--drain-timeout",
           str(args.drain), "--no-progress", "--no-plots", "--out", str(out)]
    if args.slo:
        cmd += ["--slo", args.slo]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL,  # exit 1 when nothing completed: still a row
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    stop.set()
    sampler.join()
    reqs = json.loads((out / "results.json").read_text())["requests"]
    ok = [r for r in reqs if r["status"] == "ok"]
    shed = sorted(r["end_s"] - r["sent_s"] for r in reqs if r["status"] == "http_429")
    start = args.duration / 3
    steady = sum(1 for r in ok if start <= r["end_s"] <= args.duration) / (args.duration - start)
    row = {"rate": rate, "sent": len(reqs), "ok": len(ok), "goodput_rps": len(ok) / args.duration,
           "steady_rps": steady, "shed": len(shed), "late_429": sum(1 for t in shed if t > 1.0),
           "other_errors": len(reqs) - len(ok) - len(shed),
           "engine_waiting_max": max(waiting, default=0.0),
           "engine_waiting_mean": sum(waiting) / len(waiting) if waiting else 0.0,
           "refusal_p50_s": shed[len(shed) // 2] if shed else None,
           "refusal_p99_s": shed[min(len(shed) - 1, int(0.99 * len(shed)))] if shed else None,
           "refusal_max_s": shed[-1] if shed else None}
    ttfts = sorted(r["ttft_s"] for r in ok if r.get("ttft_s") is not None)
    row["ttft_p50_s"] = ttfts[len(ttfts) // 2] if ttfts else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", default="1.0", help="req/s the stack serves (1x), or `auto`: measure it here")
    ap.add_argument("--calibrate-concurrency", type=int, default=0,
                    help="closed-loop clients for --capacity auto (0: the engines' running-batch caps summed)")
    ap.add_argument("--calibrate-duration", type=float, default=90.0, help="seconds of it")
    ap.add_argument("--factors", default="1,2,4,8")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--drain", type=float, default=30.0, help="bench --drain-timeout")
    ap.add_argument("--workload", default=README_WORKLOAD,
                    help="the README's `inferstack bench` example by default (bare `shared-prefix` is 8 groups of "
                         "2,048-token prompts: a cold prefill alone takes ~20 s on the default stack)")
    ap.add_argument("--warmup", type=float, default=600.0,
                    help="most seconds of warm-up: each group's prompt prefilled on each engine (0: none)")
    ap.add_argument("--slo", default="", help="e.g. ttft=5s: goodput counts only requests meeting it")
    ap.add_argument("--up-args", default="", help="extra `inferstack up` flags")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally below stops the stack
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc, ready = start_stack(tmp, args.up_args.split())
    gateway = ready["urls"][0]
    urls = engine_urls(tmp / "logs")
    rows = []
    try:
        if args.warmup > 0:
            t0 = time.monotonic()
            model = httpx.get(gateway + "/v1/models", timeout=10).json()["data"][0]["id"]
            warmed = warm_up(gateway, model, len(urls), args)
            settle_time(urls)
            print(json.dumps({"warmup_s": round(time.monotonic() - t0, 1), "groups_warmed": warmed}), flush=True)
        if args.capacity == "auto":
            clients = args.calibrate_concurrency or int(engine_gauge(urls, "inferstack:max_num_seqs")) or 16
            capacity = calibrate(gateway, clients, args, tmp / "calibrate")
            settle_time(urls)
            print(json.dumps({"capacity_rps": capacity, "calibrate_concurrency": clients}), flush=True)
            if capacity <= 0:
                raise SystemExit(f"the calibration completed no request in its last {args.calibrate_duration * 2 / 3:g}"
                                 " s: raise --calibrate-duration (requests run longer than that here)")
        else:
            capacity = float(args.capacity)
        for f in (float(x) for x in args.factors.split(",")):
            row = run_rate(gateway, urls, capacity * f, args, tmp / f"x{f:g}")
            row["factor"] = f
            row["engines_settle_s"] = settle_time(urls)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    base = rows[0]["goodput_rps"] or float("nan")
    steady_base = rows[0]["steady_rps"] or float("nan")
    cols = ["factor", "rate", "sent", "ok", "goodput_rps", "steady_rps", "shed", "late_429", "other_errors",
            "refusal_p50_s", "refusal_max_s", "ttft_p50_s", "engine_waiting_max", "engine_waiting_mean",
            "engines_settle_s"]
    print("\n| " + " | ".join(cols) + " | goodput vs 1x | steady vs 1x |\n|" + "---|" * (len(cols) + 2))
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else ("–" if r[c] is None else str(r[c])) for c in cols]
        print("| " + " | ".join(cells) + f" | {r['goodput_rps'] / base:.2f} | {r['steady_rps'] / steady_base:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
