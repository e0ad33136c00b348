"""`capacity`: how many replicas a load needs at an SLO, and what moves the knee — answered by the
fleet simulator (`inferstack sim sweep --find-min-replicas`), which runs the real scheduler, KV
cache and router in virtual time, so the answer costs seconds instead of GPU-hours."""

from __future__ import annotations

import json

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabRun

FLEET = "l4:llama-3-8b"
WORKLOAD = "synthetic:input=1000,output=200"
SLO = "ttft_p95=2s,tpot_p95=100ms"


def run(lab: LabRun) -> LabResult:
    rates = (1, 2, 4) if lab.quick else (1, 2, 4, 8, 16)
    duration = 60 if lab.quick else 300
    out = lab.out / "sweep"
    lab.cli("sim", "sweep", "--fleet", f"{FLEET}=1", "--workload", WORKLOAD, "--duration", str(duration),
            "--vary", "rate=" + ",".join(str(r) for r in rates), "--find-min-replicas", "--slo", SLO,
            "--max-replicas", "64", "--out", str(out), "--no-plots")
    sweep = json.loads((out / "sweep.json").read_text())
    need = [sweep["min_replicas"].get(f"rate={r}") for r in rates]
    rows = []
    for r, n in zip(rates, need, strict=True):
        run_ = next((x for x in sweep["runs"] if x["run"] == f"rate={r},replicas={n}"), None)
        rows.append([r, n, run_["ttft_p99_ms"] if run_ else None, run_["tpot_p99_ms"] if run_ else None,
                     (r / n) if n else None])
    per_replica = [row[4] for row in rows if row[4]]
    findings = [
        f"At the SLO ({SLO}) one {FLEET} replica carries about {min(per_replica):.2f}–{max(per_replica):.2f} req/s "
        f"of this load; the fleet needed grows from {need[0]} replica(s) at {rates[0]} req/s to {need[-1]} at "
        f"{rates[-1]} req/s.",
        _binding(rows[-1]),
        "What moves it: the output length (decode work), the TPOT objective, the hardware's memory bandwidth, "
        "and prefix reuse (cached prefill frees step time). Change the workload or --slo and rerun.",
    ]
    plot = bar_plot(lab.out / "replicas.png", "Fewest replicas meeting the SLO", "replicas",
                    {"replicas": [float(n or 0) for n in need]}, [f"{r} req/s" for r in rates])
    table = Table(f"{WORKLOAD} on {FLEET}, {duration} virtual s per point, SLO {SLO}",
                  ["rate (req/s)", "replicas needed", "TTFT p99 (ms)", "TPOT p99 (ms)", "req/s per replica"], rows)
    return LabResult(findings, [table], [plot], {"sweep": sweep["min_replicas"]})


def _binding(row: list) -> str:
    """Which objective is tighter at the highest load's chosen fleet size, from its p99s."""
    ttft, tpot = row[2], row[3]
    if ttft is None or tpot is None:
        return "No run at the chosen size to say which objective binds."
    t, d = ttft / 2000.0, tpot / 100.0
    which, other = ("TPOT", "TTFT") if d >= t else ("TTFT", "TPOT")
    return (f"At {row[0]} req/s on {row[1]} replicas, {which} is the tighter objective (p99 at {max(t, d):.0%} of it, "
            f"{other} at {min(t, d):.0%}): " + ("each replica's decode batch grows with load until a step is too long; "
            "more replicas split the batch." if which == "TPOT" else "prompts queue for prefill; more replicas (or "
            "prefix reuse) shorten the queue."))


LAB = Lab(
    name="capacity", week=2, title="Capacity planning with the fleet simulator",
    question="How many replicas does a load need at an SLO, and what moves the knee?",
    teaches="inferstack sim sweep --find-min-replicas: replicas vs load at a TTFT/TPOT SLO",
    needs=("inferstack sim (virtual time, no servers)",), minutes=2.0, run=run)
