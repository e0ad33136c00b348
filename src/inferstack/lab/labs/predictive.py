"""`predictive-scaling`: Dynamo's SLA planner sizing the fleet from a *forecast* of the request rate
and lengths, with three forecasters — constant (the last value: reactive), Holt (level + trend) and
Kalman (a local-level filter) — on a diurnal trace in the fleet simulator."""

from __future__ import annotations

import json

from inferstack.autoscale.forecast import FORECASTERS
from inferstack.autoscale.planner import Planner
from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.report import time_plot
from inferstack.lab.runtime import LabRun
from inferstack.sim.profile import parse_profile


def _arrival_rate(trace_path, bin_s: float) -> list[tuple[float, float | None]]:
    times = [json.loads(line)["timestamp"] for line in trace_path.read_text().splitlines() if line]
    bins = [0] * (int(max(times) // bin_s) + 1)
    for t in times:
        bins[int(t // bin_s)] += 1
    return [(i * bin_s, n / bin_s) for i, n in enumerate(bins)]


def run(lab: LabRun) -> LabResult:
    # the simulator imports torch (seconds): only the runs that simulate pay for it, not `lab list` or other labs
    from inferstack.sim.autoscale_eval import EvalSetup, diurnal_trace, evaluate
    from inferstack.sim.planner_tables import planner_tables

    minutes, peak = (4.0, 2.5) if lab.quick else (15.0, 6.0)
    setup = EvalSetup(max_replicas=16)
    trace = diurnal_trace(lab.out / "diurnal.jsonl", minutes, peak, seed=3, bursts=0)
    prefill, decode = planner_tables(parse_profile(setup.fleet), 1000, 200)
    rows = []
    for name in ("constant", "holt", "kalman"):
        lab.step(f"simulating the planner with the {name} forecaster")
        planner = Planner(prefill_tokens_per_s=prefill, decode_table=decode, ttft_p95_s=setup.slo_ttft_s,
                          itl_s=setup.slo_tpot_s * 0.8, forecaster=FORECASTERS[name]())
        rows.append(evaluate(name, planner, trace, setup))
    best = max(rows, key=lambda r: (r["attainment"], -r["replica_hours"]))
    cheap = min(rows, key=lambda r: r["replica_hours"])
    findings = [
        f"Planner on a {rows[0]['requests']}-request diurnal trace ({minutes:g} virtual min, trough 15 % of a "
        f"{peak:g} req/s peak), {setup.fleet}, {setup.cold_start_s:g} s cold start: SLO attainment "
        + ", ".join(f"{r['policy']} {r['attainment']:.1%}" for r in rows) + ".",
        "Replica-hours " + ", ".join(f"{r['policy']} {r['replica_hours']:.2f}" for r in rows)
        + "; replicas started " + ", ".join(f"{r['policy']} {r['cold_starts']}" for r in rows) + ".",
        f"Best attainment: {best['policy']} ({best['attainment']:.1%}); cheapest: {cheap['policy']} "
        f"({cheap['replica_hours']:.2f} replica-hours).",
        _lead(rows),
    ]
    table = Table(f"SLA planner with three forecasters, {setup.fleet}, bounds {setup.min_replicas}-"
                  f"{setup.max_replicas}",
                  ["forecaster", "requests", "SLO attainment", "replica-hours", "replicas started", "failed",
                   "TTFT p95 (s)"],
                  [[r["policy"], r["requests"], round(r["attainment"], 4), round(r["replica_hours"], 3),
                    r["cold_starts"], r["failed"], r["ttft_p95_s"]] for r in rows])
    plot = time_plot(lab.out / "replicas_forecasters.png", "SLA planner: constant vs Holt vs Kalman", [
        ("arrivals (req/s)", {"trace": _arrival_rate(trace, 30.0)}, None),
        ("replicas", {r["policy"]: [(t, cur) for t, cur, _ in r["timeline"]] for r in rows}, None),
        ("TTFT p95 (s)", {r["policy"]: r["ttft_p95_over_time"] for r in rows}, setup.slo_ttft_s)])
    return LabResult(findings, [table], [plot],
                     {"rows": [{k: v for k, v in r.items() if k not in ("timeline", "ttft_p95_over_time")}
                               for r in rows]})


def _lead(rows: list[dict]) -> str:
    """When each forecaster reached its peak replica count: a forecast that sees the ramp gets there sooner."""
    def first_peak(r: dict) -> float:
        return next(t for t, cur, _ in r["timeline"] if cur == r["peak_replicas"]) if r["timeline"] else 0.0
    when = {r["policy"]: first_peak(r) for r in rows}
    const = when["constant"]
    parts = [f"{name} at {t:.0f} s ({t - const:+.0f} s vs constant)" for name, t in when.items() if name != "constant"]
    return (f"Time to reach the peak fleet: constant at {const:.0f} s, " + ", ".join(parts) + ". A negative lead "
            "means the forecast started replicas before the load that needed them (the cold start is "
            "hidden); more replicas started than the peak means the forecast overshot and stopped some again.")


LAB = Lab(
    name="predictive-scaling", week=1, title="Predictive scaling",
    question="Does forecasting the load (Holt, Kalman) beat sizing for the load just seen?",
    teaches="SLA planner with constant / Holt / Kalman forecasts on a diurnal trace (simulator)",
    needs=("inferstack sim (virtual time, no servers)",), minutes=3.0, run=run)
