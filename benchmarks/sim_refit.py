"""Re-judge a step model on a stored `sim_fidelity.py --engines real` run, without running engines again.

The run's directory keeps the served calibration run's step logs (``calibrate-served/engine*-steps.jsonl``) and
each live repeat's ``results.json``. This refits the `cpu` profile on those logs with the co-location term and the
host's speed drift (``served``), with the co-location term alone (``steady``: the thirteenth stop's model) and
with neither (``flat``), simulates the run's fleet on one shared host (no host for ``flat``), and prints each
profile's error against the median of the live repeats: the six figures of the fidelity table, out of sample as
the original run measured them. The drift is a seeded draw (run seed and host name): ``--draws K`` simulates K
hosts named local0..local{K-1} and prints each figure's median over the draws and their range. Deterministic:
the same directory gives the same numbers on any machine.

    PYTHONPATH=src python benchmarks/sim_refit.py --dir /tmp/sim-fidelity-cpu --overhead-ms 3.8 \
        --workload shared-prefix:groups=2,users=4,system=128,question=24,output=24 --rate 0.5 --duration 60

``--overhead-ms``: the run's calibrated request overhead (its fidelity.md, second line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from inferstack.sim.calibrate import fit_served_steps
from inferstack.sim.hardware import save_hardware_file
from inferstack.sim.runner import SimArgs, run_simulation

FIGURES = [(m, p) for m in ("ttft", "tpot", "e2e") for p in ("p50", "p90")]


def simulate(a: argparse.Namespace, profile: Path, host: str | None, out: Path) -> list[float]:
    """Relative error of each figure of one simulation against the median of the live repeats."""
    sim_dir = out / f"{profile.stem}-{host}"
    run_simulation(SimArgs(fleet=[f"{profile}:{a.model}={a.replicas}" + (f"@{host}" if host else "")],
                           workload=a.workload, routing=a.routing, duration=a.duration, rate=a.rate, seed=a.seed,
                           tokenizer="bundled", request_overhead_ms=a.overhead_ms), sim_dir, progress=False,
                   plots=False)
    sim = json.loads((sim_dir / "results.json").read_text())["summary"]["latency_s"]
    lives = [json.loads(p.read_text())["summary"]["latency_s"]
             for p in sorted(a.dir.glob(f"live-{a.routing}-*/results.json"))]
    if not lives:
        raise SystemExit(f"{a.dir}: no live-{a.routing}-*/results.json")
    return [(sim[m][p] - statistics.median(lv[m][p] for lv in lives)) / statistics.median(lv[m][p] for lv in lives)
            for m, p in FIGURES]


def row(a: argparse.Namespace, kind: str, out: Path) -> str:
    """One table row: ``served`` (co-location and drift), ``steady`` (co-location only) or ``flat``."""
    logs = sorted((a.dir / "calibrate-served").glob("engine*-steps.jsonl"))
    hw, _ = fit_served_steps(a.model, logs, colocation=kind != "flat")
    if kind == "steady":
        hw = replace(hw, speed_jitter=0.0, speed_jitter_corr=0.0)
    profile = out / f"cpu-{kind}.json"
    save_hardware_file(hw, profile)
    hosts = [f"local{i}" for i in range(a.draws)] if kind == "served" and a.draws > 1 else \
        [None if kind == "flat" else "local"]
    errs = [simulate(a, profile, h, out) for h in hosts]
    med = [statistics.median(e[i] for e in errs) for i in range(len(FIGURES))]
    cells = [f"{m:+.1%}" + (f" ({min(e[i] for e in errs):+.1%}..{max(e[i] for e in errs):+.1%})" if len(errs) > 1
                            else "") for i, m in enumerate(med)]
    return (f"| {kind} | {hw.colocation_slowdown:.3f} | {hw.speed_jitter:.3f} / {hw.speed_jitter_corr:.2f} | "
            + " | ".join(cells) + f" | {sum(abs(e) <= 0.15 for e in med)} of 6 |")


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
    ap.add_argument("--draws", type=int, default=1, help="drift draws for the served row (hosts local0..)")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sim-refit-"))
    print("| step model | c | drift sigma / corr | " + " | ".join(f"{m.upper()} {p}" for m, p in FIGURES)
          + " | within 15 % |")
    print("|---|---|---|" + "---|" * len(FIGURES) + "---|")
    for kind in ("served", "steady", "flat"):
        print(row(a, kind, out))

if __name__ == "__main__":
    main()
