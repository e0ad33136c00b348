"""`inferstack sim sweep`: what-if grids over routing, fleet size, PD split and rate, and the search
for the smallest fleet that meets percentile SLOs. Each point is one `inferstack sim run` (its
reports under ``runs/``); the table and plots are `inferstack bench`'s sweep reports plus the fleet's
cost columns."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from inferstack.bench.report import write_run, write_series
from inferstack.bench.runner import RunResult
from inferstack.bench.slo import SLOError, parse_slo
from inferstack.sim.runner import SimArgs, SimError, build_settings, simulate

Log = Callable[[str], None]
VARY_KEYS = ("routing", "replicas", "pd", "rate")
_PCT = re.compile(r"^(?P<metric>ttft|tpot|itl|e2e)_p(?P<p>50|90|95|99)$")


def parse_vary(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in VARY_KEYS or not values.strip():
            raise SimError(f"--vary {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(VARY_KEYS)}")
        if key in out:
            raise SimError(f"--vary {key} given twice")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        for v in vals if key in ("replicas", "rate") else []:
            try:
                ok = float(v) > 0 and (key == "rate" or float(v).is_integer())
            except ValueError:
                ok = False
            if not ok:
                raise SimError(f"--vary {key}: {v!r} is not a positive {'number' if key == 'rate' else 'integer'}")
        out[key] = vals
    return out


def parse_percentile_slo(text: str | None) -> dict[tuple[str, str], float]:
    """``ttft_p95=500ms,tpot_p95=50ms`` -> {(metric, percentile): seconds}."""
    if not text:
        raise SimError("--find-min-replicas needs --slo, e.g. ttft_p95=500ms,tpot_p95=50ms")
    out: dict[tuple[str, str], float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        m = _PCT.match(key.strip().lower())
        if not m:
            raise SimError(f"--slo {part!r}: expected METRIC_pNN=DURATION (METRIC ttft|tpot|itl|e2e, NN 50|90|95|99)")
        try:
            seconds = parse_slo(f"{m.group('metric')}={value}").limits_s[m.group("metric")]
        except SLOError as e:
            raise SimError(f"--slo {part!r}: {e}") from None
        out[(m.group("metric"), f"p{m.group('p')}")] = seconds
    return out


def _apply(base: SimArgs, point: dict[str, str]) -> SimArgs:
    a = replace(base)
    if "routing" in point:
        a.routing = point["routing"]
    if "pd" in point:
        a.pd = point["pd"]
    if "rate" in point:
        a.rate = float(point["rate"])
    if "replicas" in point:
        if len(a.fleet) != 1:
            raise SimError("--vary replicas needs exactly one --fleet")
        a.fleet = [re.sub(r"=\d+", f"={int(point['replicas'])}", a.fleet[0], count=1)]
    return a


def _label(point: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "base"


def _run(a: SimArgs, out: Path, label: str, plots: bool, log: Log) -> RunResult:
    log(f"sim {label}")
    settings = build_settings(a, None)
    _, res = simulate(settings)
    write_run(res, out / "runs" / label.replace("/", "_"), title=f"Simulation {label}", plots=plots)
    return res


def _meets(res: RunResult, slo: dict[tuple[str, str], float]) -> bool:
    lat = res.summary["latency_s"]  # type: ignore[index]
    if res.summary["requests"]["failed"]:  # type: ignore[index]
        return False
    return all(lat[m] is not None and lat[m][p] <= limit for (m, p), limit in slo.items())


def min_replicas(a: SimArgs, slo: dict[tuple[str, str], float], max_replicas: int, out: Path, label: str,
                 plots: bool, log: Log) -> tuple[int | None, list[tuple[str, RunResult]]]:
    """Double from the --fleet's count until the SLO holds, then bisect (fleet sizes are integers)."""
    tried: dict[int, RunResult] = {}

    def ok(n: int) -> bool:
        if n not in tried:
            tried[n] = _run(_apply(a, {"replicas": str(n)}), out, f"{label},replicas={n}", plots, log)
        return _meets(tried[n], slo)

    start = int(re.search(r"=(\d+)", a.fleet[0]).group(1))  # type: ignore[union-attr]
    lo, hi = 0, min(start, max_replicas)
    while not ok(hi):
        if hi >= max_replicas:
            return None, [(f"{label},replicas={n}", r) for n, r in sorted(tried.items())]
        lo, hi = hi, min(2 * hi, max_replicas)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, [(f"{label},replicas={n}", r) for n, r in sorted(tried.items())]


def run_sweep(base: SimArgs, vary: list[str], out: Path, find_min: bool, max_replicas: int, plots: bool,
              log: Log) -> None:
    grid = parse_vary(vary)
    slo = parse_percentile_slo(base.slo) if find_min else None
    if find_min:
        grid.pop("replicas", None)
        base = replace(base, slo=None)
        if len(base.fleet) != 1:
            raise SimError("--find-min-replicas needs exactly one --fleet")
    out.mkdir(parents=True, exist_ok=True)
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] or [{}]
    results: list[tuple[str, RunResult]] = []
    found: dict[str, int | None] = {}
    for point in points:
        a = _apply(base, point)
        label = _label(point)
        if slo is not None:
            n, runs = min_replicas(a, slo, max_replicas, out, label, plots, log)
            found[label] = n
            results += runs
        else:
            results.append((label, _run(a, out, label, plots, log)))
    extra: dict[str, object] = {"vary": grid}
    if slo is not None:
        extra["slo"] = {f"{m}_{p}": v for (m, p), v in slo.items()}
        extra["min_replicas"] = found
    write_series(results, out, "sweep", extra)
    _fleet_table(results, out)
    (out / "sweep.json").write_text(json.dumps({**json.loads((out / "sweep.json").read_text()),
                                                "fleet": _fleet_rows(results)}, indent=1, default=float) + "\n")


def _fleet_rows(results: list[tuple[str, RunResult]]) -> list[dict[str, object]]:
    return [{"run": label, "replicas": sum(f["replicas"] for f in res.config["sim"]["fleets"]),  # type: ignore[index]
             **res.server["cost"]} for label, res in results]  # type: ignore[dict-item]


def _fleet_table(results: list[tuple[str, RunResult]], out: Path) -> None:
    lines = ["", "## Fleet cost per run", "", "| run | replicas | replica-hours | cost $ | $ / 1M tokens | "
             "kWh / 1M tokens | utilisation |", "|---|---|---|---|---|---|---|"]
    for r in _fleet_rows(results):
        per_m, kwh = r["cost_per_1m_tokens"], r["energy_kwh_per_1m_tokens"]
        lines.append(f"| {r['run']} | {r['replicas']} | {r['replica_hours']:.3f} | {r['cost']:.2f} | "
                     f"{'–' if per_m is None else f'{per_m:.3f}'} | {'–' if kwh is None else f'{kwh:.4f}'} | "
                     f"{r['utilisation']:.1%} |")
    with (out / "sweep.md").open("a") as f:
        f.write("\n".join(lines) + "\n")
