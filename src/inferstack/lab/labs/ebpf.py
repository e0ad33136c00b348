"""`ebpf`: measure an unmodified server's TTFT and ITL from the kernel, and check them against the client.

An emulated engine runs under `inferstack up`; `inferstack observe --port` attaches bpftrace probes
to the engine's TCP traffic (no change to the engine, docs/observe.md) while `inferstack bench`
drives it. Observe stops on SIGTERM and writes its results in the bench format, so both views of the
same requests sit side by side: what the client timed and what the kernel saw on the server's socket.
Before it stops, observe's /metrics is scraped and every panel of the shipped Grafana panel set for
eBPF metrics (assets/deploy/grafana/observe-ebpf.json) is listed with the metrics it reads and their
values in that scrape."""

from __future__ import annotations

import json
import re
import shutil
import sys
from urllib.parse import urlsplit

import httpx

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.labs._common import compare, completed, latency, ms
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabError, LabRun

WORKLOAD = "synthetic:input=uniform(100,1000),output=32"
METRICS = (("TTFT", "ttft"), ("ITL", "itl"), ("E2E", "e2e"))


def _unmet() -> str:
    from inferstack.observe.preflight import unavailable_reason

    return unavailable_reason() or ""


def _observed(lab: LabRun, engine: str, duration: float, rate: float) -> tuple[dict, dict, str]:
    """Bench the engine while `inferstack observe` watches its port: (client summary, eBPF summary,
    observe's /metrics at the end)."""
    out = lab.out / "observed"
    shutil.rmtree(out, ignore_errors=True)
    log = lab.out / "logs" / "observe.log"
    argv = [sys.executable, "-m", "inferstack", "observe", "--port", str(urlsplit(engine).port), "--out",
            str(out), "--no-plots", "--metrics-port", "0"]
    with lab.process("observe", argv, ready=lambda: log.exists() and "observing" in log.read_text(),
                     timeout_s=60):
        client = lab.bench(engine, WORKLOAD, "client", rate=rate, duration=duration)
        url = re.search(r"metrics: (\S+/metrics)", log.read_text())
        if url is None:
            raise LabError(f"inferstack observe did not say where its metrics are (log {log})")
        metrics = httpx.get(url.group(1), timeout=10).text
    results = out / "results.json"
    if not results.exists():
        raise LabError(f"inferstack observe wrote no results (log {log})")
    return client, json.loads(results.read_text())["summary"], metrics


def _panel_table(metrics: str) -> Table:
    """The shipped eBPF panel set against what this observe run exported."""
    from inferstack.stack.prometheus import DEPLOY
    from inferstack.telemetry.grafana import panel_values
    from inferstack.telemetry.promtext import parse

    path = DEPLOY / "grafana" / "observe-ebpf.json"
    rows = [[title, ", ".join(f"{n} = {'absent' if v is None else f'{v:g}'}" for n, v in values.items())]
            for title, values in panel_values(json.loads(path.read_text()), parse(metrics, 0.0))]
    return Table(f"Grafana panel set {path.name} (import it into Grafana; Prometheus scrapes observe's "
                 "--metrics-port): each panel's metrics in observe's /metrics at the end of the run",
                 ["panel", "metrics it reads = value"], rows)


def _gap(row: list) -> str:
    return "" if row[3] is None else f", client - eBPF = {row[3]:+.2f} ms"


def run(lab: LabRun) -> LabResult:
    why = _unmet()
    if why:
        raise LabError(f"eBPF observation cannot run here: {why}")
    duration, rate = (5.0, 3.0) if lab.quick else (30.0, 4.0)
    with lab.stack("--emulate", "l4:llama-3-8b", "--replicas", "1") as stack:
        client, kernel, metrics = _observed(lab, stack.engines[0], duration, rate)
    rows = []
    for label, key in METRICS:
        for q in ("p50", "p90"):
            c, k = ms(latency(client, key, q)), ms(latency(kernel, key, q))
            rows.append([f"{label} {q}", c, k, None if c is None or k is None else c - k])
    n_client, n_kernel = completed(client), completed(kernel)
    findings = [
        compare("TTFT p50", "client", rows[0][1], "eBPF (server socket)", rows[0][2]) + _gap(rows[0])
        + ": the kernel sees the "
        "request arrive and the first token leave the server's socket; the client adds its own side of the "
        "loopback, HTTP parsing and scheduling on a shared CPU.",
        compare("ITL p50", "client", rows[2][1], "eBPF", rows[2][2]) + _gap(rows[2])
        + ": token gaps are set by the engine, so "
        "both views should agree closely.",
        f"Requests counted: client {n_client}, eBPF {n_kernel}"
        + (" (every request seen)." if n_kernel == n_client else
           " (a request at the window's edges, or lost perf records: see observed/report.md)."),
    ]
    plot = bar_plot(lab.out / "ebpf-vs-client.png", "Client vs eBPF view of the same requests", "ms",
                    {"client": [r[1] or 0 for r in rows[:4]], "eBPF": [r[2] or 0 for r in rows[:4]]},
                    [r[0] for r in rows[:4]])  # E2E (seconds) would flatten the TTFT/ITL bars: table only
    table = Table(f"{WORKLOAD} at {rate:g} req/s for {duration:g} s against one emulated L4 engine",
                  ["metric", "client (ms)", "eBPF (ms)", "client - eBPF (ms)"], rows)
    panels = _panel_table(metrics)
    missing = [r[0] for r in panels.rows if "absent" in r[1]]
    findings.append(f"Grafana panel set: {len(panels.rows)} panels over observe's metrics, "
                    + (f"{len(missing)} without data: {', '.join(missing)}." if missing else "every one fed."))
    return LabResult(findings, [table, panels], [plot], {"client": client, "ebpf": kernel})


LAB = Lab(
    name="ebpf", week=3, title="eBPF monitoring",
    question="Can the kernel tell us an unmodified server's TTFT and ITL, and how close is it to what clients see?",
    teaches="inferstack observe (bpftrace on the server's sockets) vs the client's own timings",
    needs=("root and bpftrace", "an emulated engine (inferstack up)", "inferstack observe", "bench"),
    minutes=1.0, run=run, unmet=_unmet)
