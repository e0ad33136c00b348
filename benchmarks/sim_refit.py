"""Re-judge a step model on a stored `sim_fidelity.py --engines real` run, without running engines again.

The run's directory keeps the served calibration run's step logs (``calibrate-served/engine*-steps.jsonl``) and
each live repeat's ``results.json``. This refits the `cpu` profile on those logs with the co-location term and
without it (``flat``), simulates the run's fleet on one shared host (and without a host for ``flat``), and prints
each profile's error against the median of the live repeats: the six figures of the fidelity table, out of sample
as the original run measured them. Deterministic: the same directory gives the same numbers on any machine.

    PYTHONPATH=src python benchmarks/sim_refit.py --dir /tmp/sim-fidelity-cpu --overhead-ms 3.8 \
        --workload shared-prefix:groups=2,users=4,system=128,question=24,output=24 --rate 0.5 --duration 60

``--overhead-ms``: the run's calibrated request overhead (its fidelity.md, second line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from inferstack.sim.calibrate import fit_served_steps
from inferstack.sim.hardware import save_hardware_file
from inferstack.sim.runner import SimArgs, run_simulation

FIGURES = [(m, p) for m in ("ttft", "tpot", "e2e") for p in ("p50", "p90")]


def errors(a: argparse.Namespace, colocation: bool, out: Path) -> tuple[float, list[float]]:
    """(fitted c, relative error of each figure against the live repeats' median)."""
    logs = sorted((a.dir / "calibrate-served").glob("engine*-steps.jsonl"))
    hw, _ = fit_served_steps(a.model, logs, colocation=colocation)
    profile = out / f"cpu-{'served' if colocation else 'flat'}.json"
    save_hardware_file(hw, profile)
    sim_dir = out / profile.stem
    run_simulation(SimArgs(fleet=[f"{profile}:{a.model}={a.replicas}" + ("@local" if colocation else "")],
                           workload=a.workload, routing=a.routing, duration=a.duration, rate=a.rate, seed=a.seed,
                           tokenizer="bundled", request_overhead_ms=a.overhead_ms), sim_dir, progress=False,
                   plots=False)
    sim = json.loads((sim_dir / "results.json").read_text())["summary"]["latency_s"]
    lives = [json.loads(p.read_text())["summary"]["latency_s"]
             for p in sorted(a.dir.glob(f"live-{a.routing}-*/results.json"))]
    if not lives:
        raise SystemExit(f"{a.dir}: no live-{a.routing}-*/results.json")
    return hw.colocation_slowdown, [(sim[m][p] - statistics.median(lv[m][p] for lv in lives))
                                    / statistics.median(lv[m][p] for lv in lives) for m, p in FIGURES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="a sim_fidelity.py --engines real --out directory")
    ap.add_argument("--overhead-ms", type=float, required=True)
    ap.add_argument("--workload", default="shared-prefix:groups=2,users=4,system=128,question=24,output=24")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--routing", default="round-robin")
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sim-refit-"))
    print("| step model | c | " + " | ".join(f"{m.upper()} {p}" for m, p in FIGURES) + " | within 15 % |")
    print("|---|---|" + "---|" * len(FIGURES) + "---|")
    for colocation in (True, False):
        c, errs = errors(a, colocation, out)
        print(f"| {'served (co-location)' if colocation else 'flat'} | {c:.3f} | "
              + " | ".join(f"{e:+.1%}" for e in errs) + f" | {sum(abs(e) <= 0.15 for e in errs)} of 6 |")


if __name__ == "__main__":
    main()
