"""`autoscaling`: the Kubernetes HPA formula (desired = ceil(N x value / target), 10 % tolerance,
5-minute scale-down window) on utilisation — the accelerator's duty cycle (DCGM_FI_DEV_GPU_UTIL, target 0.7),
the baseline `benchmarks/autoscale_eval.py` measures every policy against — versus the same formula on an AI
metric (requests in the system per replica), on a bursty trace in the fleet simulator: the comparison a
custom-metrics HPA is for, in seconds of virtual time instead of a cluster. A full run adds HPA on KV-cache use
(a memory signal) and on queue depth."""

from __future__ import annotations

from inferstack.autoscale.spec import parse_policy
from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.report import time_plot
from inferstack.lab.runtime import LabRun


def _first_up(row: dict) -> float | None:
    """Virtual second of the policy's first scale-up."""
    return next((t for t, cur, want in row["timeline"] if want > cur), None)


def run(lab: LabRun) -> LabResult:
    # the simulator imports torch (seconds): only the runs that simulate pay for it, not `lab list` or other labs
    from inferstack.sim.autoscale_eval import EvalSetup, diurnal_trace, evaluate

    minutes, peak = (3.0, 2.5) if lab.quick else (12.0, 6.0)
    setup = EvalSetup(max_replicas=16)
    trace = diurnal_trace(lab.out / "bursty.jsonl", minutes, peak, seed=7, bursts=2, trough=0.4)
    policies = {"hpa on GPU util (utilisation, target 0.7)": "hpa:metric=gpu_util,target=0.7",
                "hpa on concurrency (AI metric, target 12)": "hpa:metric=concurrency,target=12"}
    if not lab.quick:
        policies["hpa on KV use (memory, target 0.7)"] = "hpa:metric=kv_usage,target=0.7"
        policies["hpa on queue (AI metric, target 2)"] = "hpa:metric=queue,target=2"
    rows = []
    for name, spec in policies.items():
        lab.step(f"simulating {name} ({spec})")
        rows.append(evaluate(name, parse_policy(spec), trace, setup))
    util, ai = rows[0], rows[1]
    findings = [
        f"Same HPA formula, same {util['requests']}-request bursty trace ({minutes:g} virtual min, peak {peak:g} req/s "
        f"with bursts at 2x), {setup.fleet} replicas with a {setup.cold_start_s:g} s cold start: on GPU util the SLO "
        f"(TTFT p95 <= {setup.slo_ttft_s:g} s, TPOT p95 <= {setup.slo_tpot_s * 1000:g} ms) held for "
        f"{util['attainment']:.1%} of requests; on concurrency for {ai['attainment']:.1%}.",
        f"Cost: {util['replica_hours']:.2f} vs {ai['replica_hours']:.2f} replica-hours (peak {util['peak_replicas']} "
        f"vs {ai['peak_replicas']} replicas); failed requests {util['failed']} vs {ai['failed']}.",
        _reaction(util, ai),
        _why(util, ai),
    ]
    table = Table(f"HPA formula on two signals, {setup.fleet}, bounds {setup.min_replicas}-{setup.max_replicas}",
                  ["policy", "requests", "SLO attainment", "replica-hours", "peak replicas", "failed",
                   "TTFT p95 (s)"],
                  [[r["policy"], r["requests"], round(r["attainment"], 4), round(r["replica_hours"], 3),
                    r["peak_replicas"], r["failed"], r["ttft_p95_s"]] for r in rows])
    plot = time_plot(lab.out / "replicas_latency.png", "HPA on utilisation vs on an AI metric", [
        ("replicas", {r["policy"].split(" (")[0]: [(t, cur) for t, cur, _ in r["timeline"]] for r in rows}, None),
        ("TTFT p95 (s)", {r["policy"].split(" (")[0]: r["ttft_p95_over_time"] for r in rows}, setup.slo_ttft_s)])
    return LabResult(findings, [table], [plot],
                     {"rows": [{k: v for k, v in r.items() if k not in ("timeline", "ttft_p95_over_time")}
                               for r in rows]})


def _reaction(util: dict, ai: dict) -> str:
    a, b = _first_up(util), _first_up(ai)
    if a is None and b is None:
        return "Neither policy scaled up on this trace."
    say = lambda t: "never" if t is None else f"at {t:.0f} s"  # noqa: E731
    return f"First scale-up: {say(a)} on GPU util, {say(b)} on concurrency."


def _why(util: dict, ai: dict) -> str:
    """The lesson, only as far as this run's numbers support it."""
    cheaper = ai["replica_hours"] < util["replica_hours"]
    if ai["attainment"] >= util["attainment"] - 0.001 and cheaper:
        return ("Here the AI metric met the SLO as often for fewer replica-hours: the duty cycle reads a replica "
                "that decodes anything as busy, however small its batch, so the utilisation HPA kept replicas it "
                "did not need; requests in the system per replica fall with the load and the formula scaled down.")
    if ai["attainment"] > util["attainment"] and not cheaper:
        return ("Here the AI metric met the SLO more often and paid for it in replicas: requests in the system "
                "grow with the queue behind a full batch, which the duty cycle (already near 1) cannot show.")
    if ai["attainment"] > util["attainment"]:
        return "Here the AI metric met the SLO more often, and for fewer replica-hours."
    return ("On this run the utilisation signal did at least as well; rerun without --quick (a longer, burstier "
            "trace) before drawing a conclusion.")


LAB = Lab(
    name="autoscaling", week=1, title="Autoscaling on custom AI metrics",
    question="Does the HPA formula scale an LLM fleet better on an AI metric than on GPU utilisation?",
    teaches="HPA formula on GPU duty cycle vs on concurrency, replicas and TTFT over time (simulator)",
    needs=("inferstack sim (virtual time, no servers)",), minutes=3.0, run=run)
