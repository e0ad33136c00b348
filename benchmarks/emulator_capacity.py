"""Emulator capacity: 16 emulated H100 engines (Llama-3-8B) in one process at 2 req/s each, 128 output
tokens streamed; does emulated time keep up with wall time?

Reports, from the same run: the emulator's own lag (steps that ended later than the performance model
said, from the summary the server prints at exit), the client-measured TPOT against the model's
prediction for the observed batch sizes, and the server's CPU use.

Run: .venv/bin/python benchmarks/emulator_capacity.py [--engines 16] [--rate-per-engine 2] [--duration 60]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from inferstack.sim.perf_model import SeqWork, step_time  # noqa: E402
from inferstack.sim.profile import parse_profile  # noqa: E402


def start_fleet(profile: str, engines: int, tmp: Path) -> tuple[subprocess.Popen, list[str], Path]:
    ready, log = tmp / "ready.json", tmp / "fleet.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "inferstack", "engine", "serve", "--emulate", profile,
                             "--emulate-count", str(engines), "--port", "0", "--ready-file", str(ready)],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (ready.exists() and ready.stat().st_size):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fleet did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["urls"], log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h100:llama-3-8b")
    ap.add_argument("--engines", type=int, default=16)
    ap.add_argument("--rate-per-engine", type=float, default=2.0)
    ap.add_argument("--input", type=int, default=512)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="emu-capacity-")))
    args = ap.parse_args()
    proc, urls, log = start_fleet(args.profile, args.engines, args.out)
    cpu0 = os.times()
    try:
        targets = [a for u in urls for a in ("--target", u)]
        rate = args.rate_per_engine * len(urls)
        subprocess.run([sys.executable, "-m", "inferstack", "bench", "run", *targets, "--workload",
                        f"synthetic:input={args.input},output={args.output}", "--rate", str(rate),
                        "--duration", str(args.duration), "--warmup", "5", "--out", str(args.out / "bench"),
                        "--no-progress", "--endpoint", "completions"],
                       env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), check=True, stdout=subprocess.DEVNULL)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    server_cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - (cpu0.children_user + cpu0.children_system)
    stats_line = [line for line in log.read_text().splitlines() if line.startswith('{"emulator"')][-1]
    emu = json.loads(stats_line)["stats"]
    steps = sum(s["steps"] for s in emu)
    late = sum(s["late_steps"] for s in emu)
    res = json.loads((args.out / "bench" / "results.json").read_text())
    s = res["summary"]
    reqs = [r for r in res["requests"] if r["included"] and r["status"] == "ok"]
    conc = s["throughput"]["requests_per_s"] / len(urls) * s["latency_s"]["e2e"]["mean"]   # Little's law per engine
    profile = parse_profile(args.profile)
    ctx = args.input + args.output // 2
    b = max(1, round(conc))
    predicted = step_time(profile.model, profile.hardware, [SeqWork(ctx, 1)] * b)
    print(f"profile {args.profile}: {len(urls)} engines in one process, {rate:g} req/s offered "
          f"({args.rate_per_engine:g}/engine), {args.output} output tokens streamed, {args.duration:g} s")
    print(f"requests ok {len(reqs)}, failed {s['requests']['failed']}; "
          f"output {s['throughput']['output_tokens_per_s']:.0f} tok/s")
    print(f"TTFT mean {s['latency_s']['ttft']['mean'] * 1e3:.1f} ms; "
          f"TPOT mean {s['latency_s']['tpot']['mean'] * 1e3:.2f} ms "
          f"vs model {predicted * 1e3:.2f} ms at batch {b} (mean concurrency/engine {conc:.2f}); "
          f"ITL p99 {s['latency_s']['itl']['p99'] * 1e3:.1f} ms")
    print(f"emulator: {steps} steps, {late} late ({late / max(1, steps):.2%}); lag p50 of late steps "
          f"{max(x['lag_p50_ms'] for x in emu):.2f} ms, max {max(x['lag_max_ms'] for x in emu):.1f} ms; "
          f"server CPU {server_cpu:.1f} s over {args.duration:g} s; load average {os.getloadavg()[0]:.1f}")
    (args.out / "capacity.json").write_text(json.dumps({"emulator": emu, "summary": s, "predicted_tpot_s": predicted,
                                                       "server_cpu_s": server_cpu}, indent=1, default=float))
    print(f"details: {args.out}")


if __name__ == "__main__":
    main()
