"""`dashboards`: Prometheus, the shipped Grafana dashboard and the live dashboard, panel by panel,
under a scripted load pattern.

`inferstack up --with-prometheus` starts two emulated L4 engines, the gateway and a real Prometheus
(Debian's, on a free port, scraping every second with the shipped recording and alert rules). The
lab sends a ramp (two rising rates), a burst (a rate well above what the fleet serves) and then
nothing (idle), and after each phase asks that Prometheus for every query of the shipped Grafana
dashboard (`assets/deploy/grafana/inferstack.json`) over the phase's window. The report shows each
panel's PromQL with the values seen in each phase, and a screenshot of the live dashboard taken
in headless Chromium after the burst."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from inferstack.lab.base import Lab, LabResult, Table, debian_binary
from inferstack.lab.labs._common import completed, latency
from inferstack.lab.runtime import LabError, LabRun, Stack
from inferstack.stack import prometheus as prom

WORKLOAD = "synthetic:input=512,output=32"
GRAFANA_JSON = prom.DEPLOY / "grafana" / "inferstack.json"
RATE_WINDOW = "4s"
Panels = list[tuple[str, str, str]]      # (title, expr, legend) of every query of the dashboard
Seen = dict[str, list[str]]              # "title\0expr" → one cell per phase


@dataclass(frozen=True)
class Phase:
    name: str
    rate: float          # requests/s; 0 = idle
    seconds: float


QUICK_PHASES = (Phase("ramp 2/s", 2, 5), Phase("ramp 5/s", 5, 5), Phase("burst 20/s", 20, 4), Phase("idle", 0, 6))
FULL_PHASES = (Phase("ramp 2/s", 2, 20), Phase("ramp 4/s", 4, 20), Phase("ramp 6/s", 6, 20),
               Phase("burst 20/s", 20, 15), Phase("idle", 0, 30))


def query(prometheus: str, expr: str, **params: float) -> list[dict]:
    """A Prometheus HTTP API query (instant, or a range with start/end/step); its result list. A clear
    error when Prometheus refuses the expression."""
    path = "query_range" if "start" in params else "query"
    body = httpx.get(f"{prometheus}/api/v1/{path}", params={"query": expr, **params}, timeout=10).json()
    if body.get("status") != "success":
        raise LabError(f"Prometheus refused {expr!r}: {body.get('error')}")
    return body["data"]["result"]


def phase_values(prometheus: str, expr: str, start: float, end: float, reduce: str) -> list[tuple[dict, float]]:
    """What a panel drew during [start, end], per series: its ``reduce`` (max, min or last) value."""
    out = []
    for series in query(prometheus, expr, start=start, end=end, step=1):
        values = [float(v) for _, v in series["values"]]
        finite = [v for v in values if not math.isnan(v)]
        pick = {"max": max, "min": min}.get(reduce, lambda v: v[-1])
        out.append((series["metric"], pick(finite) if finite else math.nan))
    return out


def _concrete(expr: str) -> str:
    """Grafana's variables as the dashboard expands them with every model and replica selected, and
    `$__rate_interval` as Grafana computes it for a 1 s scrape interval (4 scrapes)."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$model", ".*").replace("$replica", ".*")


def _wait_scraped(prometheus: str, after: float, timeout_s: float = 20) -> None:
    """Until Prometheus holds a gateway sample taken after ``after`` (unix time): the phase's last
    requests are then in what the queries see."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = query(prometheus, f'timestamp(up{{job="{prom.GATEWAY_JOB}"}})')
        if got and max(float(r["value"][1]) for r in got) > after:
            return
        time.sleep(0.2)
    raise LabError(f"Prometheus at {prometheus} has not scraped the gateway since the phase ended")


def _fmt(series: list[tuple[dict[str, str], float]], legend: str) -> str:
    """One cell: the value, or `legend=value` per series (at most four), "no data" for none."""
    finite = [(labels, v) for labels, v in series if not math.isnan(v)]
    if not finite:
        return "no data" if not series else "NaN (no samples in window)"
    if len(finite) == 1:
        return f"{finite[0][1]:.3g}"
    def name(labels: dict[str, str]) -> str:
        out = legend
        for k, v in labels.items():
            out = out.replace("{{" + k + "}}", v)
        return re.sub(r"\{\{\w+\}\}", "(none)", out)    # a `... or vector(0)` fallback has no labels
    cells = [f"{name(labels)}={v:.3g}" for labels, v in sorted(finite, key=lambda s: -s[1])[:4]]
    return ", ".join(cells) + (f" (+{len(finite) - 4})" if len(finite) > 4 else "")


def _run_phase(lab: LabRun, stack: Stack, phase: Phase) -> list:
    """Send the phase's load; its row of the load table (what the client saw), none for idle."""
    if not phase.rate:
        lab.step(f"idle for {phase.seconds:g} s (no requests)")
        time.sleep(phase.seconds)   # the idle phase is the absence of load: nothing to wait for but time
        return []
    s = lab.bench(stack.gateway, WORKLOAD, phase.name.replace(" ", "-").replace("/", "per"), rate=phase.rate,
                  duration=phase.seconds, drain_s=15)
    return [phase.name, phase.seconds, phase.rate, completed(s), latency(s, "ttft", "p50")]


def _panel_queries() -> Panels:
    dash = json.loads(GRAFANA_JSON.read_text())
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dash["panels"] for t in p.get("targets", [])]


def run(lab: LabRun) -> LabResult:
    phases = QUICK_PHASES if lab.quick else FULL_PHASES
    config = {"up": {"emulate": "l4:llama-3-8b", "replicas": 2, "scrape_interval_s": 1.0,
                     "engine_args": ["--max-num-seqs", "16"]}}
    panels = _panel_queries()
    seen: dict[str, list[str]] = {}
    raw: dict[str, dict[str, list]] = {}
    shot, load = None, []
    with lab.stack("--with-prometheus", config=config) as stack:
        if not stack.prometheus:
            raise LabError("inferstack up --with-prometheus reported no Prometheus URL")
        for phase in phases:
            start = time.time()
            if row := _run_phase(lab, stack, phase):
                load.append(row)
            end = time.time()
            _wait_scraped(stack.prometheus, end)
            for title, expr, legend in panels:
                worst = "min" if "attainment" in title.lower() else "max"   # attainment: lower is worse
                series = phase_values(stack.prometheus, _concrete(expr), start, end, worst if phase.rate else "last")
                seen.setdefault(f"{title}\0{expr}", []).append(_fmt(series, legend))
                raw.setdefault(phase.name, {})[f"{title}: {expr}"] = [[lbl, v] for lbl, v in series]
            if phase.rate and phase is max(phases, key=lambda p: p.rate):
                shot = _screenshot(lab, stack)
    return _result(phases, panels, seen, raw, shot, load)


def _screenshot(lab: LabRun, stack: Stack) -> Path | None:
    from inferstack.lab.browser import chromium_missing, screenshot_page

    if chromium_missing() or not stack.dashboard:
        lab.step(f"no dashboard screenshot: {chromium_missing() or 'the stack serves no dashboard'}")
        return None
    lab.step("screenshot of the live dashboard (headless Chromium)")
    return screenshot_page(stack.dashboard, lab.out / "dashboard.png", width=1400, height=1000,
                           ready_js="document.querySelectorAll('#endpoints tbody tr').length > 0")


def _num(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _result(phases: tuple[Phase, ...], panels: Panels, seen: Seen, raw: dict, shot: Path | None,
            load: list[list]) -> LabResult:
    values = [[title if not legend or "{{" in legend else f"{title} [{legend}]", *seen[f"{title}\0{expr}"]]
              for title, expr, legend in panels]
    table = Table("The tour: every panel of the shipped Grafana dashboard as the lab's Prometheus computed it (range "
                  "queries, 1 s step, every model and replica): the peak during each load phase (the lowest for SLO "
                  "attainment), the value at the end of the idle phase", ["panel", *(p.name for p in phases)], values)
    promql = Table(f"Each panel's PromQL (Grafana's $__rate_interval is {RATE_WINDOW} here: 4 scrapes of 1 s)",
                   ["panel", "legend", "PromQL"],
                   [[title, legend, f"`{_concrete(expr)}`"] for title, expr, legend in panels])
    idle = ", ".join(f"{p.name} {p.seconds:g} s" for p in phases if not p.rate)
    tables = [Table(f"Load phases ({WORKLOAD}) and what the client saw; then no requests ({idle})",
                    ["phase", "seconds", "requests/s sent", "completed", "client TTFT p50 (s)"], load), table, promql]
    return LabResult(_findings(phases, panels, seen), tables, [shot] if shot else [], {"phases": raw},
                     [f"`inferstack up --emulate l4:llama-3-8b --replicas 2 --with-prometheus` (scrape every 1 s), "
                      f"load `{WORKLOAD}`", f"Grafana JSON: `{GRAFANA_JSON.relative_to(prom.DEPLOY.parent.parent)}` "
                      "(import it in Grafana with a Prometheus data source)"])


def _cells(panels: Panels, seen: Seen, title: str) -> list[str] | None:
    for t, expr, _ in panels:
        if t == title:
            return seen[f"{t}\0{expr}"]
    return None


def _findings(phases: tuple[Phase, ...], panels: Panels, seen: Seen) -> list[str]:
    out = []
    names = [p.name for p in phases]
    for title, what in (("Requests/s by status", "requests/s answered"),
                        ("Time to first token", "TTFT p50 (s)"),
                        ("Gateway queue depth by priority", "gateway queue depth"),
                        ("Running and waiting requests per replica", "running per replica"),
                        ("KV cache use per replica", "KV cache use"),
                        ("TTFT SLO attainment (≤ 1 s)", "TTFT SLO attainment")):
        cells = _cells(panels, seen, title)
        if cells:
            out.append(f"{title} ({what}): " + "; ".join(f"{n}: {c}" for n, c in zip(names, cells, strict=True)) + ".")
    ttft = _cells(panels, seen, "Time to first token")
    if ttft:
        vals = [_num(c) for c in ttft]
        finite = [(n, v) for n, v in zip(names, vals, strict=True) if v is not None]
        if finite:
            worst = max(finite, key=lambda x: x[1])
            out.append(f"TTFT p50 peaked in `{worst[0]}` at {worst[1]:.3g} s; a windowed percentile over a phase with "
                       "no requests has no samples, which Grafana draws as a gap, not as zero.")
    return out


LAB = Lab(
    name="dashboards", week=3, title="AI dashboards",
    question="What does each dashboard panel show when the load ramps up, bursts and stops, and which PromQL "
             "computes it?",
    teaches="Prometheus + the Grafana dashboard + the live dashboard, panel by panel, under ramp/burst/idle load",
    needs=("2 emulated L4 engines + gateway (inferstack up --emulate)", "Prometheus (started by inferstack up)",
           "Chromium for the screenshot (optional)", "inferstack bench"),
    minutes=3.0, run=run, unmet=debian_binary("prometheus"))
