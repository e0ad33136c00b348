"""Autoscaling policies side by side in the simulator (virtual time): SLO attainment, replica-hours,
failed requests and cold starts, on a trace with daily swings and bursts (or any trace given).

Every policy runs the same trace on the same fleet type, starting from the same replica count,
with the same cold-start delay, bounds and decision interval. HPA scales on a utilisation-like
signal (KV use per replica) and, as a second row, on concurrency; KPA/APA on concurrency; SLO on
p95 TTFT/TPOT; the planner forecasts and sizes from tables read off the same performance model.

    PYTHONPATH=src python benchmarks/autoscale_eval.py [--trace FILE] [--minutes 60] [--cold-start 60]
    # a real trace: the Azure 2023 conversation trace (Splitwise), compressed 2x
    PYTHONPATH=src python benchmarks/autoscale_eval.py --trace AzureLLMInferenceTrace_conv.csv --time-scale 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from inferstack.autoscale.planner import Planner
from inferstack.autoscale.spec import parse_policy
from inferstack.sim.autoscale_eval import EvalSetup, diurnal_trace, evaluate
from inferstack.sim.planner_tables import planner_tables
from inferstack.sim.profile import parse_profile


def policies(profile_text: str, slo_ttft: float, slo_tpot: float, target: int) -> dict[str, object]:
    prefill, decode = planner_tables(parse_profile(profile_text), 1000, 200)
    return {
        "hpa (KV use 0.7)": parse_policy("hpa:metric=kv_usage,target=0.7"),
        # the same HPA formula on an AI signal: requests in the system per replica
        f"hpa (concurrency {target})": parse_policy(f"hpa:metric=concurrency,target={target}"),
        f"kpa (target {target})": parse_policy(f"kpa:target={target}"),
        f"apa (target {target})": parse_policy(f"apa:metric=concurrency,target={target}"),
        "slo": parse_policy(f"slo:ttft_p95={slo_ttft}s,tpot_p95={slo_tpot}s"),
        "planner (holt)": Planner(prefill_tokens_per_s=prefill, decode_table=decode, ttft_p95_s=slo_ttft,
                                  itl_s=slo_tpot * 0.8, forecaster=parse_policy("planner:forecaster=holt").forecaster),
    }


def setup_of(a: argparse.Namespace) -> EvalSetup:
    return EvalSetup(fleet=a.fleet, start=a.start, min_replicas=a.min, max_replicas=a.max, cold_start_s=a.cold_start,
                     interval_s=a.interval, max_num_seqs=a.max_num_seqs, slo_ttft_s=a.slo_ttft, slo_tpot_s=a.slo_tpot,
                     seed=a.seed, time_scale=a.time_scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the generated diurnal trace")
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
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--target", type=int, default=12,
                    help="kpa/apa: requests in flight per replica (the concurrency one replica serves within the SLO)")
    ap.add_argument("--only", default="", help="comma-separated policy name prefixes")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    trace = a.trace or diurnal_trace(Path(tempfile.mkdtemp()) / "diurnal.jsonl", a.minutes, a.peak_rps, a.seed)
    rows = []
    for name, policy in policies(a.fleet, a.slo_ttft, a.slo_tpot, a.target).items():
        if a.only and not any(name.startswith(p) for p in a.only.split(",")):
            continue
        row = evaluate(name, policy, trace, setup_of(a))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("timeline", "ttft_p95_over_time")}), flush=True)
    hpa = next((r for r in rows if r["policy"].startswith("hpa")), None)
    print("\n| policy | SLO attainment | replica-hours | vs hpa | peak replicas | failed | cold starts "
          "| TTFT p95 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{r['replica_hours'] / hpa['replica_hours']:.2f}x" if hpa else "–"
        ttft = f"{r['ttft_p95_s']:.2f}" if r["ttft_p95_s"] is not None else "–"
        print(f"| {r['policy']} | {r['attainment']:.1%} | {r['replica_hours']:.2f} | {rel} | {r['peak_replicas']} | "
              f"{r['failed']} | {r['cold_starts']} | {ttft} |")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
