"""Autoscaling policies side by side in the simulator (virtual time): SLO attainment, replica-hours,
failed requests and cold starts, on a trace with daily swings and bursts, a Mooncake-like trace, or
any trace given. Virtual time: the numbers do not depend on the machine's load.

Every policy runs the same trace on the same fleet type, starting from the same replica count, with
the same cold-start delay, bounds and decision interval. The baselines:
- `hpa (GPU util T)`: the HPA on the accelerator's duty cycle (DCGM_FI_DEV_GPU_UTIL, the "utilisation"
  teams scale GPU pods on) at each `--util-targets` value (0.7 is the usual advice); the utilisation
  baseline is the cheapest of them reaching `--goal` attainment, and the cost ratio is measured against it;
- `hpa (KV use)`: the HPA on KV-cache use (another utilisation-like signal);
- `hpa (concurrency T)`: the HPA on requests in the system per replica, the default 300 s scale-down
  stabilisation and a tuned 60 s, at each `--hpa-targets` value (the best-tuned HPA is reported too);
- `kpa` / `apa` on concurrency; then ours: `slo` (Little's law + objectives) and `planner` (Holt).

    PYTHONPATH=src python benchmarks/autoscale_eval.py --fleet l4:llama-3-8b --minutes 10 --peak-rps 6 \\
        --start 1 --max 24 --cold-start 30 --interval 10 --max-num-seqs 32 --slo-ttft 2 --slo-tpot 0.1 \\
        --seed 2 --jobs 2 --plot docs/img/autoscale_eval_seed2.png
    # the Mooncake-like trace (long shared-prefix prompts, bursty arrivals)
    PYTHONPATH=src python benchmarks/autoscale_eval.py ...same... --trace-kind mooncake --peak-rps 2
    # where the misses and the replica-hours go (per 30 s), why they missed (by the fleet's state when sent),
    # and hindsight rows (a bound, not a policy)
    PYTHONPATH=src python benchmarks/autoscale_eval.py ...same... --diagnose --oracle 0.5,0.6
    # a real trace: the Azure 2023 conversation trace (Splitwise), compressed 2x
    PYTHONPATH=src python benchmarks/autoscale_eval.py --trace AzureLLMInferenceTrace_conv.csv --time-scale 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from inferstack.autoscale.planner import Planner
from inferstack.autoscale.spec import parse_policy
from inferstack.bench.traces import load_trace
from inferstack.sim.autoscale_eval import (
    ACCOUNTINGS,
    CAUSES,
    UTIL,
    EvalSetup,
    Oracle,
    Verdict,
    baseline,
    cheapest,
    diurnal_trace,
    evaluate,
    judge,
    mooncake_like_trace,
)
from inferstack.sim.planner_tables import planner_tables
from inferstack.sim.profile import parse_profile


def policies(a: argparse.Namespace) -> dict[str, object]:
    prefill, decode = planner_tables(parse_profile(a.fleet), 1000, 200)
    holt = parse_policy("planner:forecaster=holt").forecaster
    out: dict[str, object] = {f"{UTIL} {t})": parse_policy(f"hpa:metric=gpu_util,target={t}")
                              for t in a.util_targets.split(",")}
    out["hpa (KV use 0.7)"] = parse_policy("hpa:metric=kv_usage,target=0.7")
    for t in a.hpa_targets.split(","):
        out[f"hpa (concurrency {t})"] = parse_policy(f"hpa:metric=concurrency,target={t}")
        out[f"hpa (concurrency {t}, 60s)"] = parse_policy(
            f"hpa:metric=concurrency,target={t},scale_down_stabilization=60s")
    slo = f"slo:ttft_p95={a.slo_ttft}s,tpot_p95={a.slo_tpot}s" + (
        f",concurrency={a.slo_concurrency}" if a.slo_concurrency else "")
    out |= {
        f"kpa (target {a.target})": parse_policy(f"kpa:target={a.target}"),
        f"apa (target {a.target})": parse_policy(f"apa:metric=concurrency,target={a.target}"),
        f"slo (concurrency {parse_policy(slo).concurrency:g})": parse_policy(slo),
        # the scale-up forecast from Holt's level and trend instead of the least-squares line (twelfth stop)
        f"slo (concurrency {parse_policy(slo).concurrency:g}, holt)": parse_policy(f"{slo},forecaster=holt"),
        # thirteenth stop: hold 85 % of the fleet for 30 s after a step down in the arrivals, with less headroom
        f"slo (concurrency {parse_policy(slo).concurrency:g}, step hold)": parse_policy(
            f"{slo},spare=0.9,step_hold=30s"),
        # fourteenth stop: the step hold with the full headroom, halved while the arrival trend falls, and the
        # capacity learned over 2 minutes (a miss at the replica bound no longer holds the fleet there for 5)
        f"slo (concurrency {parse_policy(slo).concurrency:g}, step hold, falling spare)": parse_policy(
            f"{slo},step_hold=30s,falling_spare=0.5,learn_window=120s"),
        # fifteenth stop: the same with 0.9 of the headroom (the valid requests' attainment has the room for it)
        f"slo (concurrency {parse_policy(slo).concurrency:g}, step hold, falling spare, spare 0.9)": parse_policy(
            f"{slo},step_hold=30s,falling_spare=0.5,learn_window=120s,spare=0.9"),
        # the defaults of the sixth stop, for comparison: no forecast, plain square-root headroom, 40 s and halves
        "slo (sixth-stop defaults)": parse_policy(f"{slo},horizon=0s,spare=1.5,dispersion=false,"
                                                  "scale_down_stabilization=40s,max_step_down=0.5"),
        # the forecast setting: the arrival-rate trend carried one cold start ahead, with less headroom
        f"slo (forecast {a.cold_start:g}s, spare 0.75)": parse_policy(
            f"{slo},horizon={a.cold_start}s,spare=0.75,max_boost=2"),
        "planner (holt)": Planner(prefill_tokens_per_s=prefill, decode_table=decode, ttft_p95_s=a.slo_ttft,
                                  itl_s=a.slo_tpot * 0.8, forecaster=holt),
        # with slo's headroom and stabilisation (its seed-1 values, not tuned for the planner)
        "planner (holt, spare 1.5, 40s)": Planner(
            prefill_tokens_per_s=prefill, decode_table=decode, ttft_p95_s=a.slo_ttft, itl_s=a.slo_tpot * 0.8,
            forecaster=holt, spare=1.5, scale_down_stabilization_s=40.0, max_step_down=0.5),
    }
    return out


def oracles(a: argparse.Namespace, trace: Path) -> dict[str, object]:
    sent = tuple(sorted(r.timestamp for r in load_trace(trace)))
    return {f"oracle (hindsight, {c:g} req/s per replica)": Oracle(sent, c, a.cold_start, a.interval)
            for c in (float(x) for x in a.oracle.split(",") if x)}


def setup_of(a: argparse.Namespace) -> EvalSetup:
    return EvalSetup(fleet=a.fleet, start=a.start, min_replicas=a.min, max_replicas=a.max, cold_start_s=a.cold_start,
                     interval_s=a.interval, max_num_seqs=a.max_num_seqs, slo_ttft_s=a.slo_ttft, slo_tpot_s=a.slo_tpot,
                     seed=a.seed, time_scale=a.time_scale)


def _run(job: tuple[str, object, Path, EvalSetup]) -> dict[str, Any]:
    return evaluate(*job)


def report(rows: list[dict[str, Any]], goal: float) -> None:
    util = baseline(rows, goal)
    print(f"\n| policy | SLO attainment | valid requests after 1st cold start | replica-hours "
          f"| vs {util['policy'] if util else UTIL + ')'} | peak replicas | failed | cold starts | TTFT p95 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{r['replica_hours'] / util['replica_hours']:.2f}x" if util else "–"
        ttft = f"{r['ttft_p95_s']:.2f}" if r["ttft_p95_s"] is not None else "–"
        valid = f"{r['attainment_valid']:.2%}" if r.get("attainment_valid") is not None else "–"
        print(f"| {r['policy']} | {r['attainment']:.2%} | {valid} | {r['replica_hours']:.2f} | {rel} | "
              f"{r['peak_replicas']} | {r['failed']} | {r['cold_starts']} | {ttft} |")
    ours = cheapest(rows, "slo", goal) or cheapest(rows, "planner", goal)
    for label, base in (("hpa on GPU util", util), ("best hpa on concurrency", cheapest(rows, "hpa (conc", goal))):
        if ours and base:
            print(f"\n{ours['policy']} vs {label} ({base['policy']}, {base['attainment']:.2%}): "
                  f"{ours['replica_hours'] / base['replica_hours']:.3f}x the replica-hours")
    if not ours:
        print(f"\nno policy of ours reached {goal:.0%} attainment")


def diagnose(rows: list[dict[str, Any]], bin_s: float) -> None:
    """Per bin of the trace (by send time): requests sent, and per policy the requests that missed the SLO (failed
    ones included) and the mean replicas it paid for (starting ones included) — which burst the misses come from
    and where the replica-hours go; then per policy its misses by the fleet's state when they were sent
    (`miss_cause`: a cold start, after a scale-down, at the bound...)."""
    print("\n| from (s) | sent | " + " | ".join(f"{r['policy']}: missed, replicas" for r in rows) + " |")
    print("|---:|---:|" + "---:|" * len(rows))
    for i, (start, sent, _) in enumerate(rows[0]["misses_over_time"]):
        cells = []
        for r in rows:
            paid = [cur for t, cur, _ in r["timeline"] if start < t <= start + bin_s]
            missed = r["misses_over_time"][i][2] if i < len(r["misses_over_time"]) else 0
            cells.append(f"{missed}, {sum(paid) / len(paid):.1f}" if paid else f"{missed}, –")
        print(f"| {start:g} | {sent} | " + " | ".join(cells) + " |")
    print("\n| why the requests missed (`miss_cause`) | " + " | ".join(r["policy"] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for cause in CAUSES:
        print(f"| {cause} | " + " | ".join(str(r["miss_causes"].get(cause, 0)) for r in rows) + " |")


def plot(rows: list[dict[str, Any]], path: Path, slo_ttft: float, goal: float) -> None:
    from inferstack.lab.report import time_plot

    util = baseline(rows, goal)
    shown = [r for r in rows if r is util or r["policy"].startswith(("slo", "planner", "kpa"))
             or r["policy"].endswith("60s)")]
    time_plot(path, "Replicas and p95 TTFT over time (simulator, virtual time)", [
        ("replicas", {r["policy"]: [(t, cur) for t, cur, _ in r["timeline"]] for r in shown}, None),
        ("TTFT p95 (s)", {r["policy"]: r["ttft_p95_over_time"] for r in shown}, slo_ttft)])


def run_seed(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Every selected policy on the trace of ``a`` (its seed), each row printed as JSON when it finishes."""
    make = mooncake_like_trace if a.trace_kind == "mooncake" else diurnal_trace
    trace = a.trace or make(Path(tempfile.mkdtemp()) / f"{a.trace_kind}.jsonl", a.minutes, a.peak_rps, a.seed)
    jobs = [(name, p, trace, setup_of(a)) for name, p in (policies(a) | oracles(a, trace)).items()
            if not a.only or any(name.startswith(x) for x in a.only.split(","))]
    rows = []
    with Pool(max(1, a.jobs)) as pool:
        for row in pool.imap(_run, jobs):
            rows.append(row)
            print(json.dumps({"seed": a.seed} | {k: v for k, v in row.items()
                                                 if not k.endswith(("timeline", "_over_time"))}), flush=True)
    return rows


def seed_list(text: str) -> list[int]:
    """``26-30`` or ``1,3,5`` (or both: ``1-5,16``) as seeds."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def judge_seeds(a: argparse.Namespace) -> None:
    """The goal's verdict on each seed (held-out seeds are judged once, after the setting was chosen elsewhere),
    under each accounting of the attainment (`ACCOUNTINGS`: every request, or the valid ones sent after the first
    cold start), the baseline chosen by the same accounting."""
    verdicts: dict[tuple[str, str], list[Verdict]] = {}
    for seed in seed_list(a.seeds):
        a.seed = seed
        rows = run_seed(a)
        for accounting, key in ACCOUNTINGS.items():
            base = baseline(rows, a.goal, key)
            print(f"seed {seed}, {accounting} requests: baseline {base['policy'] if base else 'none'}"
                  + (f" {base[key]:.2%} at {base['replica_hours']:.2f} rh" if base else ""))
            for v in judge(rows, a.goal, a.max_cost, key=key):
                cost = f"{v.cost:.3f}x" if v.cost is not None else "–"
                print(f"  {v.policy}: {v.attainment:.2%} at {cost}, failed {v.failed} (kpa {v.kpa_failed})"
                      f"{'  GOAL MET' if v.met else ''}", flush=True)
                verdicts.setdefault((accounting, v.policy), []).append(v)
    for (accounting, policy), vs in verdicts.items():
        costs = [v.cost for v in vs if v.cost is not None]
        print(f"{accounting} requests, {policy}: goal met on {sum(v.met for v in vs)} of {len(vs)}; mean "
              f"{sum(v.attainment for v in vs) / len(vs):.2%} at {sum(costs) / max(1, len(costs)):.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=None, help="replay this trace file instead of generating one")
    ap.add_argument("--trace-kind", choices=("diurnal", "mooncake"), default="diurnal",
                    help="the generated trace: a day with three 2x bursts, or Mooncake-like long shared prompts")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the generated trace")
    ap.add_argument("--peak-rps", type=float, default=30.0)
    ap.add_argument("--fleet", default="h100:llama-3-8b")
    ap.add_argument("--start", type=int, default=2)
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("--max", type=int, default=24)
    ap.add_argument("--cold-start", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--slo-ttft", type=float, default=1.0)
    ap.add_argument("--slo-tpot", type=float, default=0.06)
    ap.add_argument("--slo-concurrency", type=float, default=None,
                    help="slo: requests one replica holds within the objectives (default: the policy's)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the generated trace and of the simulation")
    ap.add_argument("--target", type=int, default=12,
                    help="kpa/apa: requests in flight per replica (the concurrency one replica serves within the SLO)")
    ap.add_argument("--hpa-targets", default="6,8", help="comma-separated concurrency targets of the hpa rows")
    ap.add_argument("--util-targets", default="0.6,0.7,0.8",
                    help="comma-separated GPU duty-cycle targets of the utilisation hpa rows (the baseline: the "
                         "cheapest reaching --goal)")
    ap.add_argument("--goal", type=float, default=0.99, help="attainment the cost comparison requires")
    ap.add_argument("--only", default="", help="comma-separated policy name prefixes")
    ap.add_argument("--jobs", type=int, default=1, help="policies simulated at once (processes)")
    ap.add_argument("--out", type=Path, default=None, help="write every row (timelines included) as JSON")
    ap.add_argument("--oracle", default="",
                    help="comma-separated arrival rates per replica (e.g. 0.45): also run a hindsight row at each, "
                         "which reads the trace's future arrivals (a bound, not a policy)")
    ap.add_argument("--diagnose", action="store_true",
                    help="also print, per 30 s of the trace (by send time), the requests that missed the SLO "
                         "and the replicas paid for")
    ap.add_argument("--plot", type=Path, default=None, help="write replicas and p95 TTFT over time (PNG)")
    ap.add_argument("--seeds", default="",
                    help="judge on several generated traces (e.g. 26-30 or 1,3,5; overrides --seed): per seed the "
                         "goal's verdict for every slo/planner row, then goal met on k of n and the means")
    ap.add_argument("--max-cost", type=float, default=0.75,
                    help="--seeds: the goal's replica-hours / the utilisation baseline's, at most")
    a = ap.parse_args()
    if a.seeds:
        judge_seeds(a)
        return
    rows = run_seed(a)
    report(rows, a.goal)
    if a.diagnose:
        diagnose(rows, setup_of(a).bin_s)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))
    if a.plot:
        plot(rows, a.plot, a.slo_ttft, a.goal)


if __name__ == "__main__":
    main()
