"""Live confirmation of the simulator's autoscaling ranking: `inferstack up --autoscale` on emulated
engines, one policy at a time, on the same bursty trace, next to the simulator on that trace.

For each policy: start `inferstack up --emulate FLEET` with `up.autoscale` (the local actuator,
docs/autoscaling.md), replay the trace open loop with the `inferstack bench` client (streamed, so
TTFT is measured), sample the gateway's `inferstack_autoscaler_*` series every second, stop the
stack. Then run the same policies over the same trace in the simulator (`autoscale_eval.evaluate`,
cold start set to the live one) and print both tables: SLO attainment, replica-seconds, peak
replicas, failures, TTFT p95, scale-ups. `--out DIR` keeps the per-second timelines (JSON) and a plot
of replicas and TTFT over time per policy.

    PYTHONPATH=src python benchmarks/autoscale_live.py --minutes 3 --out runs/autoscale-live
    PYTHONPATH=src python benchmarks/autoscale_live.py --cold-starts 3 [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from inferstack.autoscale.spec import parse_policy
from inferstack.bench.client import ClientOptions
from inferstack.bench.runner import LoadSpec, RunConfig, execute
from inferstack.bench.slo import parse_slo
from inferstack.bench.workloads import parse_workload
from inferstack.telemetry import promtext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoscale_eval import evaluate, setup_of  # the simulator side, same trace

POLICIES = "kpa:target=4,stable_window=20s,panic_window=4s;apa:metric=concurrency,target=4,window=20s;" \
           "hpa:metric=concurrency,target=4,scale_down_stabilization=30s"


def bursty_trace(path: Path, minutes: float, base_rps: float, burst_rps: float, seed: int,
                 burst_s: float = 30.0) -> Path:
    """A quiet base rate with two bursts of ``burst_s`` seconds (at 25 % and 60 % of the span);
    lengths log-normal around 300 in / 60 out."""
    rng = random.Random(seed)
    span = minutes * 60.0
    bursts = [span * 0.25, span * 0.6]
    t, rows = 0.0, []
    while True:
        rate = burst_rps if any(b <= t < b + burst_s for b in bursts) else base_rps
        t += rng.expovariate(rate)
        if t >= span:
            break
        rows.append({"timestamp": round(t, 4), "input_tokens": int(min(2000, rng.lognormvariate(5.7, 0.6))),
                     "output_tokens": int(min(200, max(8, rng.lognormvariate(4.1, 0.5))))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stack_config(a: argparse.Namespace, policy: str) -> str:
    model = {"model": a.model} if a.model else {"emulate": a.fleet, "engine_args": ["--max-num-seqs",
                                                                                  str(a.max_num_seqs)]}
    idle = 2.0 if a.cold_starts else 600
    return json.dumps({"up": {**model, "autoscale": {
        "policy": policy, "min_replicas": 0 if a.cold_starts else a.min, "max_replicas": a.max,
        "interval_s": a.interval, "window_samples": max(8, int(60 / a.interval)), "idle_s": idle,
        "hold_timeout_s": 300}}})


def at_zero(gateway: str) -> bool:
    reps = replicas_now(httpx.get(gateway + "/metrics", timeout=5).text)
    return "ready" in reps and reps["ready"] + reps.get("starting", 0) + reps.get("draining", 0) == 0


def _has_token(sse_line: str) -> bool:
    """An SSE event carrying generated text (not the role-only first chunk)."""
    if not sse_line.startswith("data:") or sse_line.strip() == "data: [DONE]":
        return False
    choices = json.loads(sse_line[5:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def measure_cold_starts(a: argparse.Namespace, work: Path) -> None:
    """`--cold-starts N`: N times, wait until the stack scaled to zero, send one streamed request and
    time its first token (the whole cold start a client sees)."""
    proc, gateway = start_stack(a, "kpa:target=8", work)
    try:
        model = httpx.get(gateway + "/v1/models", timeout=10).json()["data"][0]["id"]
        for i in range(a.cold_starts):
            deadline = time.monotonic() + 300
            while not at_zero(gateway):
                if time.monotonic() > deadline:
                    raise RuntimeError("the stack did not scale to zero")
                time.sleep(0.2)
            t0 = time.perf_counter()
            with httpx.stream("POST", gateway + "/v1/chat/completions", timeout=300, json={
                    "model": model, "max_tokens": 8, "stream": True,
                    "messages": [{"role": "user", "content": f"hello {i}"}]}) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()
                next(line for line in lines if _has_token(line))
                ttft = time.perf_counter() - t0
                for _ in lines:
                    pass
            print(json.dumps({"cold_start": i, "model": model, "ttft_s": round(ttft, 3)}), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def start_stack(a: argparse.Namespace, policy: str, work: Path) -> tuple[subprocess.Popen, str]:
    cfg, ready = work / "inferstack.yaml", work / "ready.json"
    cfg.write_text(stack_config(a, policy))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "inferstack", "up", "--config", str(cfg), "--port", "0",
                             "--ready-file", str(ready), "--log-dir", str(work / "logs"), "--replicas", str(a.start)],
                            stdout=(work / "up.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ready.exists() and ready.stat().st_size:
            return proc, json.loads(ready.read_text().splitlines()[0])["urls"][0]
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"inferstack up did not start:\n{(work / 'up.log').read_text()[-3000:]}")


def replicas_now(text: str) -> dict[str, float]:
    names = {"inferstack_autoscaler_desired_replicas", "inferstack_autoscaler_replicas"}
    scrape = promtext.parse(text, 0.0, names=names)
    out = {"desired": sum(scrape.select("inferstack_autoscaler_desired_replicas").values())}
    for labels, v in scrape.select("inferstack_autoscaler_replicas").items():
        out[dict(labels)["state"]] = v
    return out


async def sample_replicas(gateway: str, clock0: float, stop: asyncio.Event, into: list[dict]) -> None:
    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            try:
                text = (await client.get(gateway + "/metrics", timeout=5)).text
                into.append({"t": time.perf_counter() - clock0, **replicas_now(text)})
            except httpx.HTTPError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def live_run(a: argparse.Namespace, gateway: str, model: str, trace: Path) -> tuple[dict, list, list]:
    cfg = RunConfig(targets=[gateway], model=model, workload=parse_workload(f"trace:path={trace}"), load=LoadSpec(),
                    duration_s=a.minutes * 60, slo=parse_slo(f"ttft={a.slo_ttft}s,tpot={a.slo_tpot}s"),
                    client=ClientOptions(request_timeout_s=300), progress=False, drain_timeout_s=120)
    stop, timeline = asyncio.Event(), []
    sampler = asyncio.create_task(sample_replicas(gateway, time.perf_counter(), stop, timeline))
    res = await execute(cfg)
    stop.set()
    await sampler
    per_request = [(r.sent, r.ttft) for r in res.records]
    return res.summary, timeline, per_request


def live_row(name: str, summary: dict, timeline: list[dict]) -> dict:
    """Replica-seconds integrate ready + starting (a starting replica costs what a serving one does)."""
    seconds = sum((b["t"] - a_["t"]) * (a_.get("ready", 0) + a_.get("starting", 0))
                  for a_, b in itertools.pairwise(timeline))
    # replicas ordered (as the simulator counts cold starts), from the start count on
    ups = sum(max(0, b.get("desired", 0) - max(a_.get("desired", 0), 1)) for a_, b in itertools.pairwise(timeline))
    return {"policy": name, "attainment": summary["slo"]["attainment"], "replica_s": seconds,
            "peak": max((p.get("ready", 0) for p in timeline), default=0), "failed": summary["requests"]["failed"],
            "requests": summary["requests"]["sent"], "scale_ups": ups,
            "ttft_p95_s": (summary["latency_s"]["ttft"] or {}).get("p95")}


def plot(out: Path, runs: dict[str, tuple[list[dict], list]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 6), sharex=True, squeeze=False)
    for i, (name, (timeline, per_request)) in enumerate(runs.items()):
        ax = axes[0][i]
        ts = [p["t"] for p in timeline]
        ax.step(ts, [p.get("ready", 0) for p in timeline], where="post", label="ready")
        ax.step(ts, [p.get("desired", 0) for p in timeline], where="post", label="desired", linestyle="--")
        ax.set_title(name if len(name) <= 40 else name[:39] + "…", fontsize=9)
        ax.set_ylabel("replicas")
        ax.legend()
        t0 = min((s for s, _ in per_request), default=0.0)
        axes[1][i].scatter([s - t0 for s, v in per_request if v is not None],
                           [v for _, v in per_request if v is not None], s=4)
        axes[1][i].set_ylabel("TTFT (s)")
        axes[1][i].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(out / "autoscale_live.png", dpi=90)


def table(title: str, rows: list[dict], seconds_key: str) -> str:
    lines = [f"\n{title}\n", "| policy | SLO attainment | replica-seconds | peak replicas | failed | scale-ups "
             "| TTFT p95 (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ttft = f"{r['ttft_p95_s']:.2f}" if r.get("ttft_p95_s") is not None else "–"
        lines.append(f"| {r['policy']} | {r['attainment']:.1%} | {r[seconds_key]:.0f} | {r['peak']} | {r['failed']} "
                     f"| {r['scale_ups']} | {ttft} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleet", default="h100:llama-3-8b")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--base-rps", type=float, default=0.5)
    ap.add_argument("--burst-rps", type=float, default=8.0)
    ap.add_argument("--burst-s", type=float, default=30.0, help="length of each of the two bursts")
    ap.add_argument("--max-num-seqs", type=int, default=4, help="per emulated replica: what makes one replica fill")
    ap.add_argument("--start", type=int, default=1)
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("--max", type=int, default=4)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--slo-ttft", type=float, default=1.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--cold-start", type=float, default=None, help="for the simulator (default: measured live)")
    ap.add_argument("--policies", default=POLICIES, help="POLICY specs separated by ';'")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--model", default=None, help="a real model (e.g. smollm2-135m) instead of --fleet emulation")
    ap.add_argument("--cold-starts", type=int, default=0,
                    help="only measure this many cold-start TTFTs (scale to zero, one request, repeat)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autoscale-live-"))
    if a.cold_starts:
        return measure_cold_starts(a, work)
    trace = bursty_trace(work / "trace.jsonl", a.minutes, a.base_rps, a.burst_rps, a.seed, a.burst_s)
    live, runs, colds = [], {}, []
    for i, spec in enumerate(a.policies.split(";")):
        run_dir = work / f"{i}-{spec.split(':')[0]}"     # one policy may be given twice with other keys
        run_dir.mkdir()
        proc, gateway = start_stack(a, spec, run_dir)
        try:
            model = httpx.get(gateway + "/v1/models", timeout=10).json()["data"][0]["id"]
            summary, timeline, per_request = asyncio.run(live_run(a, gateway, model, trace))
            colds += [float(line.split("after ")[1].split("s ")[0]) for line in (run_dir / "up.log").read_text()
                      .splitlines() if "joined the pool after" in line]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        row = live_row(spec, summary, timeline)
        live.append(row)
        runs[spec] = (timeline, per_request)
        print(json.dumps(row), flush=True)
    cold = a.cold_start if a.cold_start is not None else (sum(colds) / len(colds) if colds else 10.0)
    sim_args = argparse.Namespace(fleet=a.fleet, start=a.start, time_scale=1.0, slo_ttft=a.slo_ttft,
                                  slo_tpot=a.slo_tpot, seed=a.seed, max_num_seqs=a.max_num_seqs, min=a.min, max=a.max,
                                  interval=a.interval, cold_start=math.ceil(cold))
    sim = []
    for spec in a.policies.split(";"):
        r = evaluate(spec, parse_policy(spec), trace, setup_of(sim_args))
        sim.append({**r, "replica_s": r["replica_hours"] * 3600, "peak": r["peak_replicas"],
                    "scale_ups": r["cold_starts"]})
    print(f"\ntrace: {trace} ({sum(1 for _ in trace.open())} requests over {a.minutes:g} min); live cold start "
          f"(spawn to ready) mean {cold:.1f}s over {len(colds)} scale-ups")
    print(table("live (`inferstack up --autoscale`, emulated engines)", live, "replica_s"))
    print(table(f"simulator (same trace, cold start {math.ceil(cold)} s)", sim, "replica_s"))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "live.json").write_text(json.dumps({"live": live, "sim": [{k: v for k, v in r.items()
                                                                           if k != "timeline"} for r in sim],
                                                     "timelines": {k: v[0] for k, v in runs.items()}}, indent=1))
        plot(a.out, runs)


if __name__ == "__main__":
    main()
