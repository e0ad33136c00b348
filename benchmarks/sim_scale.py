"""Scale of `inferstack sim`: simulated requests per CPU second, and what that means for the issue's
target of 1,000 replicas x 1,000,000 requests (Llama-3-8B on H100, mean 1,000 in / 200 out) in 10 minutes
on one core.

Each configuration runs in its own child process (so its peak RSS is its own), with per-request records
streamed to disk as `inferstack sim run` does. Reported: CPU seconds (`time.process_time`, less affected
by other load on a shared machine than wall time), wall seconds, peak RSS, simulated requests per CPU
second, and the extrapolation of that rate to the target's request count. `--decode-run-steps 0` runs the
simulator one event per engine step (no decode leaps) and `--python-routing` routes without the columnar
twin (`gateway/routing/columns.py`), each for a before/after in the same run (same records sha256).

    PYTHONPATH=src python benchmarks/sim_scale.py --replicas 100,1000 --requests 20000 \
        --routing round-robin,default --out /tmp/sim-scale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGET_REQUESTS = 1_000_000
TARGET_CPU_S = 600.0


def one(a: argparse.Namespace) -> dict:
    """Run one configuration in this process; the parent reads the JSON line it prints."""
    from inferstack.sim.runner import SimArgs, build_settings, simulate

    rate = a.rate_per_replica * a.replicas
    args = SimArgs(fleet=[f"{a.profile}={a.replicas}"], workload=a.workload, rate=rate, duration=a.requests / rate,
                   seed=a.seed, routing=a.routing)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = build_settings(args, out)
    settings.sample_every = max(1, a.requests // 20_000)
    settings.decode_run_steps = a.decode_run_steps
    settings.columnar_routing = not a.python_routing
    if a.kv_digest:
        settings.kv_digest = a.kv_digest
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sim, res = simulate(settings)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    lat: dict = res.summary.get("latency_s") or {}  # type: ignore[assignment]
    return {"replicas": a.replicas, "routing": a.routing + (" (python)" if a.python_routing else ""),
            "decode_run_steps": a.decode_run_steps,
            "requests": sim.completed, "ok": int(sum(sim.sink.ok)), "virtual_s": round(sim.now, 2),
            "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "req_per_cpu_s": round(sim.completed / cpu, 1), "engine_events": sim.events,
            "ttft_p50_ms": round(1e3 * lat["ttft"]["p50"], 1) if lat.get("ttft") else None,
            "tpot_p50_ms": round(1e3 * lat["tpot"]["p50"], 2) if lat.get("tpot") else None,
            "records_bytes": (out / "requests.stream.csv").stat().st_size,
            # leaps are exact: the same configuration with and without them writes the same records
            "records_sha256": hashlib.sha256((out / "requests.stream.csv").read_bytes()).hexdigest()[:16]}


def _child(a: argparse.Namespace, replicas: int, routing: str, leap: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", "--replicas", str(replicas), "--routing", routing,
           "--requests", str(a.requests), "--rate-per-replica", str(a.rate_per_replica), "--workload", a.workload,
           "--profile", a.profile, "--seed", str(a.seed), "--decode-run-steps", str(leap), "--out", str(out)]
    cmd += ["--python-routing"] if a.python_routing else []
    cmd += ["--kv-digest", a.kv_digest] if a.kv_digest else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="100,1000", help="comma-separated fleet sizes")
    p.add_argument("--requests", type=int, default=20_000, help="requests per configuration")
    p.add_argument("--routing", default="round-robin,default", help="comma-separated routing presets")
    p.add_argument("--rate-per-replica", type=float, default=5.0,
                   help="Poisson arrivals per replica per virtual second (5: the fleet ~97-100%% busy)")
    p.add_argument("--workload", default="synthetic:input=1000,output=200")
    p.add_argument("--profile", default="h100:llama-3-8b")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--decode-run-steps", default="64", help="comma-separated; 0 = one event per engine step")
    p.add_argument("--python-routing", action="store_true",
                   help="route with the Python path, not the columnar one (same decisions; for a before/after)")
    p.add_argument("--kv-digest", default="", help="the replicas' KV block-hash digest (sha256: the engines' own; "
                   "default: the simulator's, xxh3-128; same records)")
    p.add_argument("--out", default="/tmp/sim-scale")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.replicas, a.decode_run_steps = int(a.replicas), int(a.decode_run_steps)
        print(json.dumps(one(a)))
        return
    rows = []
    for replicas in (int(x) for x in a.replicas.split(",")):
        for routing in a.routing.split(","):
            for leap in (int(x) for x in a.decode_run_steps.split(",")):
                tag = "-python" if a.python_routing else ""
                row = _child(a, replicas, routing, leap, Path(a.out) / f"{replicas}-{routing}-{leap}{tag}")
                row["extrapolated_1m_cpu_s"] = round(TARGET_REQUESTS / row["req_per_cpu_s"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| replicas | routing | leaps | requests | virtual s | CPU s | wall s | req/CPU-s | max RSS MiB | "
          "1M requests: CPU s (vs 600) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replicas']} | {r['routing']} | {r['decode_run_steps'] or 'off'} | {r['requests']:,} | "
              f"{r['virtual_s']} | {r['cpu_s']} | {r['wall_s']} | {r['req_per_cpu_s']} | {r['max_rss_mib']} | "
              f"{r['extrapolated_1m_cpu_s']:,} ({r['extrapolated_1m_cpu_s'] / TARGET_CPU_S:.1f}x) |")


if __name__ == "__main__":
    main()
