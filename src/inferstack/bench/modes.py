"""Multi-run modes: a sweep from light load to saturation, and a goodput search (the highest rate whose
SLO attainment meets the target)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from inferstack.bench.report import write_run, write_series
from inferstack.bench.runner import LoadSpec, RunConfig, RunResult, run_sync

Log = Callable[[str], None]


def _one(cfg: RunConfig, out: Path, label: str, log: Log, plots: bool) -> RunResult:
    log(f"run {label}: {cfg.load.label}")
    res = run_sync(cfg)
    write_run(res, out / "runs" / label.replace("/", "_"), title=f"Run {label}", plots=plots)
    return res


def sweep(cfg: RunConfig, out: Path, points: int, saturation_concurrency: int, log: Log,
          plots: bool = True) -> list[tuple[str, RunResult]]:
    """Measure saturation throughput with a closed loop, then `points` open-loop rates up to it."""
    sat = _one(replace(cfg, load=LoadSpec(concurrency=saturation_concurrency)), out, "saturation", log, plots)
    r_max = float(sat.summary["throughput"]["requests_per_s"])  # type: ignore[index]
    if r_max <= 0:
        raise RuntimeError("the saturation run completed no request; see runs/saturation/report.md")
    results: list[tuple[str, RunResult]] = []
    for i in range(1, points + 1):
        rate = r_max * i / points
        load = replace(cfg.load, rate=rate, concurrency=None)
        results.append((f"rate-{rate:.3g}", _one(replace(cfg, load=load), out, f"rate-{rate:.3g}", log, plots)))
    write_series(results, out, "sweep", {"saturation_requests_per_s": r_max,
                                         "saturation_concurrency": saturation_concurrency})
    return results


def search_max_rate(probe: Callable[[float], bool], start: float, precision: float = 0.1,
                    max_runs: int = 12) -> tuple[float | None, float | None]:
    """Double the rate while `probe` passes, then bisect to `precision`; halve up to twice when even the
    start fails. Returns (highest passing rate or None, lowest failing rate or None)."""
    good: float | None = None
    bad: float | None = None
    rate, runs = start, 0
    while runs < max_runs:
        runs += 1
        if probe(rate):
            good = rate
            if bad is not None:
                break
            rate *= 2
        else:
            bad = rate
            if good is not None or runs >= 3:
                break          # three failing halvings: no rate meets the SLO
            rate /= 2
    while good is not None and bad is not None and (bad - good) / bad > precision and runs < max_runs:
        runs += 1
        mid = (good + bad) / 2
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good, bad


def goodput_search(cfg: RunConfig, out: Path, start_rate: float, log: Log, precision: float = 0.1,
                   max_runs: int = 12, plots: bool = True) -> tuple[float | None, list[tuple[str, RunResult]]]:
    """The highest open-loop rate whose SLO attainment meets the target (None if none does)."""
    assert cfg.slo is not None
    results: list[tuple[str, RunResult]] = []

    def attempt(rate: float) -> bool:
        load = replace(cfg.load, rate=rate, concurrency=None)
        res = _one(replace(cfg, load=load), out, f"rate-{rate:.4g}", log, plots)
        results.append((f"rate-{rate:.4g}", res))
        slo = res.summary["slo"]  # type: ignore[index]
        log(f"  attainment {slo['attainment']:.1%} (need {cfg.slo.attainment:.0%}) at {rate:.4g} req/s")  # type: ignore[union-attr]
        return bool(slo["met"])

    good, bad = search_max_rate(attempt, start_rate, precision, max_runs)
    write_series(results, out, "goodput", {"slo": str(cfg.slo), "max_rate_meeting_slo": good,
                                           "lowest_failing_rate": bad})
    return good, results
