"""The Grafana dashboard, written as code so every panel query is one reviewable line.

All rates and percentiles are windowed (`$__rate_interval`), never lifetime `_sum/_count` averages.
A second panel set reads only what `inferstack observe` exports (eBPF, `source="ebpf"`,
docs/observe.md). Regenerate the shipped JSON after a change (a test fails while they differ):

    PYTHONPATH=src python -m inferstack.telemetry.grafana src/inferstack/assets/deploy/grafana/inferstack.json \
        src/inferstack/assets/deploy/grafana/observe-ebpf.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from inferstack.telemetry.promtext import Scrape

W = "$__rate_interval"
M = 'model=~"$model"'
R = 'replica=~"$replica"'
TTFT = "gen_ai_server_time_to_first_token_seconds"
TPOT = "gen_ai_server_time_per_output_token_seconds"
E2E = "gen_ai_server_request_duration_seconds"
ITL = "inferstack_gateway_inter_token_latency_seconds"
TTFT_OK = 'le=~"1(\\\\.0)?"'   # TTFT SLO: <= 1 s (a bucket bound; see recording-rules.yml)
TPOT_OK = 'le=~"0\\\\.1"'       # TPOT SLO: <= 100 ms


def _pct(hist: str, q: float, by: str = "le", match: str = M) -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({hist}_bucket{{{match}}}[{W}])))"


def _good(hist: str, ok: str) -> str:
    return f"sum(rate({hist}_bucket{{{ok},{M}}}[{W}]))"


def _total(hist: str) -> str:
    return f"sum(rate({hist}_count{{{M}}}[{W}]))"


GOODPUT = f"({_good(TTFT, TTFT_OK)} <= {_good(TPOT, TPOT_OK)}) or {_good(TPOT, TPOT_OK)}"

# (row title, [(panel title, kind, unit, [(expr, legend)]), ...])
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]] = [
    ("Service level", [
        ("TTFT SLO attainment (≤ 1 s)", "stat", "percentunit",
         [(f"{_good(TTFT, TTFT_OK)} / {_total(TTFT)}", "TTFT ≤ 1 s")]),
        ("TPOT SLO attainment (≤ 100 ms)", "stat", "percentunit",
         [(f"{_good(TPOT, TPOT_OK)} / {_total(TPOT)}", "TPOT ≤ 100 ms")]),
        ("Goodput (requests/s meeting both SLOs, upper bound)", "timeseries", "reqps",
         [(GOODPUT, "goodput"), (_total(TTFT), "all requests")]),
        ("SLO attainment over time", "timeseries", "percentunit",
         [(f"({GOODPUT}) / {_total(TTFT)}", "both SLOs"),
          (f"{_good(TTFT, TTFT_OK)} / {_total(TTFT)}", "TTFT"),
          (f"{_good(TPOT, TPOT_OK)} / {_total(TPOT)}", "TPOT")]),
        ("Error-budget burn, 5 min (99% objective)", "timeseries", "none",
         [(f"(1 - sum(rate({TTFT}_bucket{{{TTFT_OK},{M}}}[5m])) / sum(rate({TTFT}_count{{{M}}}[5m]))) / 0.01",
           "TTFT burn"),
          (f"(1 - sum(rate({TPOT}_bucket{{{TPOT_OK},{M}}}[5m])) / sum(rate({TPOT}_count{{{M}}}[5m]))) / 0.01",
           "TPOT burn")]),
        ("5xx ratio", "timeseries", "percentunit",
         [(f'(sum(rate(inferstack_gateway_requests_total{{status=~"5..",{M}}}[{W}])) or vector(0)) / '
           f"sum(rate(inferstack_gateway_requests_total{{{M}}}[{W}]))", "5xx / all")]),
    ]),
    ("Latency (gateway, windowed percentiles)", [
        (title, "timeseries", "s", [(_pct(hist, q), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)])
        for title, hist in (("Time to first token", TTFT), ("Time per output token", TPOT),
                            ("Inter-token latency", ITL), ("Request duration (E2E)", E2E))
    ]),
    ("Traffic and routing", [
        ("Requests/s by status", "timeseries", "reqps",
         [(f"sum by (status) (rate(inferstack_gateway_requests_total{{{M}}}[{W}]))", "{{status}}")]),
        ("Tokens/s", "timeseries", "short",
         [(f"sum by (type) (rate(inferstack_gateway_tokens_total{{{M}}}[{W}]))", "{{type}}")]),
        ("Requests/s per endpoint", "timeseries", "reqps",
         [(f"sum by (endpoint) (rate(inferstack_gateway_requests_total{{{M}}}[{W}]))", "{{endpoint}}")]),
        ("Routing decisions/s by profile and deciding scorer", "timeseries", "short",
         [(f"sum by (profile, scorer) (rate(inferstack_gateway_routing_decisions_total[{W}]))",
           "{{profile}} / {{scorer}}")]),
        ("Sheds and retries /s", "timeseries", "short",
         [(f"sum(rate(inferstack_gateway_shed_total[{W}])) or vector(0)", "shed"),
          (f"sum(rate(inferstack_gateway_retries_total[{W}])) or vector(0)", "retries")]),
        ("Gateway queue depth by priority", "timeseries", "short",
         [("sum by (priority) (inferstack_gateway_queue_depth) or vector(0)", "priority {{priority}}")]),
    ]),
    ("Replicas", [
        ("Replica up", "timeseries", "short",
         [('up{job=~"inferstack-.*"}', "{{job}} {{replica}}")]),
        ("Running and waiting requests per replica", "timeseries", "short",
         [(f"sum by (replica) (vllm:num_requests_running{{{R}}})", "{{replica}} running"),
          (f"sum by (replica) (vllm:num_requests_waiting{{{R}}})", "{{replica}} waiting")]),
        ("KV cache use per replica", "timeseries", "percentunit",
         [(f"max by (replica) (vllm:kv_cache_usage_perc{{{R}}})", "{{replica}}")]),
        ("Prefix cache hit ratio per replica", "timeseries", "percentunit",
         [(f"sum by (replica) (rate(vllm:prefix_cache_hits_total{{{R}}}[{W}])) / "
           f"sum by (replica) (rate(vllm:prefix_cache_queries_total{{{R}}}[{W}]))", "{{replica}}")]),
        ("Engine TTFT p95 per replica", "timeseries", "s",
         [(_pct("vllm:time_to_first_token_seconds", 0.95, "le, replica", R), "{{replica}}")]),
        ("Generated tokens/s per replica", "timeseries", "short",
         [(f"sum by (replica) (rate(vllm:generation_tokens_total{{{R}}}[{W}]))", "{{replica}}")]),
        ("Engine queue time p95 per replica", "timeseries", "s",
         [(_pct("vllm:request_queue_time_seconds", 0.95, "le, replica", R), "{{replica}}")]),
        ("Preemptions/s per replica", "timeseries", "short",
         [(f"sum by (replica) (rate(vllm:num_preemptions_total{{{R}}}[{W}]))", "{{replica}}")]),
    ]),
    ("Autoscaling (docs/autoscaling.md)", [
        ("Desired vs actual replicas", "timeseries", "short",
         [("sum by (pool, role, policy) (inferstack_autoscaler_desired_replicas)",
           "{{pool}} {{role}} desired ({{policy}})"),
          ("sum by (pool, role, state) (inferstack_autoscaler_replicas)", "{{pool}} {{role}} {{state}}")]),
        ("Scaling decisions/s by direction and reason", "timeseries", "short",
         [(f'sum by (pool, policy, direction, reason) (rate(inferstack_autoscaler_decisions_total'
           f'{{direction!="hold"}}[{W}]))', "{{pool}} {{policy}} {{direction}}: {{reason}}")]),
        ("Requests held for a cold start (scale from zero)", "timeseries", "short",
         [("sum by (pool) (inferstack_gateway_held_requests)", "{{pool}} held"),
          (f"sum by (pool, outcome) (rate(inferstack_gateway_hold_outcomes_total[{W}]))", "{{pool}} {{outcome}} /s")]),
        ("Cold-start wait p95 (held requests released)", "timeseries", "s",
         [(_pct("inferstack_gateway_hold_wait_seconds", 0.95, "le, pool", ""), "{{pool}}")]),
    ]),
]

EB = 'source="ebpf",endpoint=~"$target"'     # observe's request metrics, per observed process
OJ = 'job=~"$job"'                              # observe's capture-health counters
Rows = list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]]]]]]
EBPF_ROWS: Rows = [
    ("Observed server (eBPF, no instrumentation)", [
        *[(title, "timeseries", "s", [(_pct(hist, q, match=EB), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)])
          for title, hist in (("Time to first token (socket read → first content chunk)", TTFT),
                              ("Inter-token latency (gaps between SSE chunks)", ITL),
                              ("Time per output token", TPOT), ("Request duration (E2E)", E2E))],
        ("Requests/s by status", "timeseries", "reqps",
         [(f"sum by (status) (rate(inferstack_gateway_requests_total{{{EB}}}[{W}]))", "{{status}}")]),
        ("Tokens/s (from the usage chunk or counted chunks)", "timeseries", "short",
         [(f'sum by (type) (rate(inferstack_gateway_tokens_total{{source="ebpf"}}[{W}]))', "{{type}}")]),
    ]),
    ("Capture health", [
        ("Syscall segments/s on watched connections", "timeseries", "short",
         [(f"sum(rate(inferstack_observe_segments_total{{{OJ}}}[{W}]))", "segments")]),
        ("Bytes/s moved and captured", "timeseries", "Bps",
         [(f"sum by (kind) (rate(inferstack_observe_bytes_total{{{OJ}}}[{W}]))", "{{kind}}")]),
        ("Lost perf records/s (raise --buffer-pages)", "timeseries", "short",
         [(f"sum(rate(inferstack_observe_lost_events_total{{{OJ}}}[{W}]))", "lost")]),
        ("Connections/s followed, TLS among them", "timeseries", "short",
         [(f"sum(rate(inferstack_observe_connections_total{{{OJ}}}[{W}]))", "connections"),
          (f"sum(rate(inferstack_observe_tls_connections_total{{{OJ}}}[{W}]))", "TLS (not decoded)")]),
        ("HTTP resyncs (bytes beyond the capture)", "stat", "short",
         [(f"max(inferstack_observe_desyncs{{{OJ}}})", "resyncs")]),
    ]),
]

DS = {"type": "prometheus", "uid": "${datasource}"}


def _panel(pid: int, title: str, kind: str, unit: str, targets: list[tuple[str, str]],
           x: int, y: int) -> dict[str, Any]:
    w, h = (6, 5) if kind == "stat" else (12, 8)
    panel: dict[str, Any] = {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }
    if kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area"}
        panel["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "orange", "value": 0.95},
                                          {"color": "green", "value": 0.99}]}
    else:
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}}
    return panel


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def _panels(rows: Rows) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, row_panels in rows:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, kind, unit, targets in row_panels:
            panel = _panel(pid, title, kind, unit, targets, x, y)
            w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
            if x + w > 24:
                x, y = 0, y + h
                panel["gridPos"].update(x=x, y=y)
            panels.append(panel)
            pid, x = pid + 1, x + w
        y += 8
    return panels


def dashboard() -> dict[str, Any]:
    return {
        "uid": "inferstack-overview", "title": "inferstack — gateway, SLOs and replicas",
        "tags": ["inferstack", "llm", "vllm"], "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "timezone": "browser",
        "graphTooltip": 1,
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            _variable("model", "model", f"label_values({TTFT}_count, model)"),
            _variable("replica", "replica", "label_values(vllm:num_requests_running, replica)"),
        ]},
        "annotations": {"list": []},
        "panels": _panels(ROWS),
    }


def ebpf_dashboard() -> dict[str, Any]:
    """The panel set for `inferstack observe`: the gateway's latency panels over `source="ebpf"`, and
    the capture's health."""
    return {
        "uid": "inferstack-observe-ebpf", "title": "inferstack observe — eBPF view of an unmodified server",
        "tags": ["inferstack", "llm", "ebpf"], "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "timezone": "browser", "graphTooltip": 1,
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            _variable("target", "observed process",
                      f'label_values({TTFT}_count{{source="ebpf"}}, endpoint)'),
            _variable("job", "observe job", "label_values(inferstack_observe_segments_total, job)"),
        ]},
        "annotations": {"list": []},
        "panels": _panels(EBPF_ROWS),
    }


def render(dash: dict[str, Any] | None = None) -> str:
    return json.dumps(dashboard() if dash is None else dash, indent=1, ensure_ascii=False) + "\n"


_METRIC = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{")


def metric_names(expr: str) -> set[str]:
    """The sample names an expression selects (every selector in these dashboards has braces)."""
    return set(_METRIC.findall(expr))


def panel_values(dash: dict[str, Any], scrape: Scrape) -> list[tuple[str, dict[str, float | None]]]:
    """Per panel: each sample name its queries select → the sum of that name's samples in ``scrape``
    (None when the scrape has none): whether a target feeds every panel, and with what."""
    out = []
    for p in dash["panels"]:
        names = sorted({n for t in p.get("targets", []) for n in metric_names(t["expr"])})
        if names:
            out.append((p["title"], {n: sum(scrape.select(n).values()) if scrape.has(n) else None for n in names}))
    return out


def expressions(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query in a dashboard JSON."""
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


if __name__ == "__main__":
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(render())
        if len(sys.argv) > 2:
            Path(sys.argv[2]).write_text(render(ebpf_dashboard()))
    else:
        sys.stdout.write(render())
