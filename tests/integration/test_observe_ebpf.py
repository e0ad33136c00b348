"""`inferstack observe` against the real thing: bpftrace attached to an emulated engine while
`inferstack bench` drives it; every request's TTFT and ITL from eBPF against the client's own, and
eBPF's TTFT/ITL histograms against the engine's own (its /metrics before and after)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from tests.support.procs import Server, metric_sum, start_inferstack
from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.observe.crosscheck import HistogramCheck, compare, samples
from inferstack.observe.preflight import unavailable_reason
from inferstack.observe.runner import CaptureOptions
from inferstack.observe.session import Session, SessionResult, save
from inferstack.stack.prometheus import DEPLOY
from inferstack.telemetry.grafana import panel_values
from inferstack.telemetry.promtext import parse

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"eBPF observation unavailable: {REASON}")


@pytest.fixture(scope="module")
def engine() -> Iterator[Server]:
    srv = start_inferstack(["engine", "serve", "--emulate", "h100:llama-3-8b"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def observed(engine: Server, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Path, Path, str, dict, list[HistogramCheck]]]:
    """20 streamed requests (8/s, constant arrivals) measured by the client, by eBPF and by the engine."""
    port = int(engine.url.rsplit(":", 1)[1])
    engine_before = parse(httpx.get(f"{engine.url}/metrics").text, 0.0)
    session = Session(None, port, CaptureOptions(), metrics_port=0, log=lambda m: None)
    session.start()
    bench_dir, obs_dir = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("observed")
    base = f"http://127.0.0.1:{session.metrics_port}"
    httpx.get(f"{base}/dashboard/api/state")          # a viewer: the dashboard starts sampling
    try:
        res = CliRunner().invoke(app, ["bench", "run", "--target", engine.url, "--workload",
                                       "synthetic:input=64,output=24", "--rate", "8", "--arrival", "constant",
                                       "--duration", "2.5", "--out", str(bench_dir), "--no-progress",
                                       "--no-plots", "--scrape-interval", "5"])
        assert res.exit_code == 0, res.output
        deadline = time.monotonic() + 5       # the last response is released within ~reorder_ms
        while True:
            metrics = httpx.get(f"{base}/metrics").text
            if metric_sum(metrics, "gen_ai_server_time_to_first_token_seconds_count") >= 20 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        dashboard = httpx.get(f"{base}/dashboard/api/state").json()
    finally:
        session.stop()
        result: SessionResult = session.finish()
    save(result, obs_dir, plots=False, capture_bodies=False)
    checks = compare(engine_before, parse(httpx.get(f"{engine.url}/metrics").text, 1.0), parse(metrics, 1.0),
                     samples(result.requests))
    yield bench_dir, obs_dir, metrics, dashboard, checks


def _rows(d: Path) -> list[dict]:
    rows = json.loads((d / "results.json").read_text())["requests"]
    return sorted(rows, key=lambda r: r["sent_s"])


def test_ttft_and_itl_match_the_client_per_request(observed: tuple) -> None:
    bench_dir, obs_dir, _, _, _ = observed
    client, ebpf = _rows(bench_dir), _rows(obs_dir)
    assert len(client) == 20 and len(ebpf) == 20
    assert all(r["status"] == "ok" for r in ebpf), [r["error"] for r in ebpf]
    # paired by arrival order (arrivals are 125 ms apart): same chunk and token counts
    assert [r["chunks"] for r in ebpf] == [r["chunks"] for r in client] == [24] * 20
    assert [r["output_tokens"] for r in ebpf] == [r["output_tokens"] for r in client]
    assert [r["prompt_tokens"] for r in ebpf] == [r["prompt_tokens"] for r in client]
    ttft_err = np.abs([e["ttft_s"] - c["ttft_s"] for e, c in zip(ebpf, client, strict=True)]) * 1e3
    itl_err = np.abs([e["itl_mean_s"] - c["itl_mean_s"] for e, c in zip(ebpf, client, strict=True)]) * 1e3
    # median ≤ 2 ms as the issue asks; the tail is bounded at p90: the rest is the client process being
    # scheduled late on a loaded 2-core machine (arrival matches, the first chunk reaches the client late;
    # benchmarks/observe_accuracy.py reports the p99 over more requests)
    assert np.median(ttft_err) <= 2.0 and np.percentile(ttft_err, 90) <= 5.0, ttft_err
    assert np.median(itl_err) <= 2.0 and np.percentile(itl_err, 90) <= 5.0, itl_err
    # the kernel sees the request before the client's clock stops: eBPF TTFT is not longer by more than noise
    assert np.median([c["ttft_s"] - e["ttft_s"] for e, c in zip(ebpf, client, strict=True)]) > -0.0005


def test_metrics_endpoint_dashboard_and_bench_compare(observed: tuple) -> None:
    bench_dir, obs_dir, metrics, dashboard, _ = observed
    n = metric_sum(metrics, "gen_ai_server_time_to_first_token_seconds_count", 'source="ebpf"')
    assert n == 20
    assert metric_sum(metrics, "inferstack_gateway_tokens_total", 'type="output"') == 20 * 24
    assert metric_sum(metrics, "inferstack_observe_lost_events_total") == 0
    res = CliRunner().invoke(app, ["bench", "compare", str(bench_dir), str(obs_dir)])
    assert res.exit_code == 0, res.output
    assert "| completed / failed | 20 / 0 | 20 / 0 |" in res.output
    # the live dashboard charts the observed server from the same metrics (windowed TTFT percentiles)
    p50 = [v for _, v in dashboard["charts"]["ttft"]["series"].get("p50", []) if v is not None]
    assert p50 and 0.001 < max(p50) < 1.0, dashboard["charts"]["ttft"]
    report = (obs_dir / "report.md").read_text()
    assert "## eBPF capture" in report and "lost perf records: 0" in report


def test_histograms_match_the_engines_own(observed: tuple) -> None:
    """The engine's vllm:time_to_first_token / inter_token_latency histograms over the same 20 requests:
    equal counts (20 TTFTs, 20 × 23 gaps); gaps: means within 2 ms and, at every bucket bound both
    share, cumulative counts that differ only by gaps within 2 ms of it; TTFT: eBPF's never shorter
    (it also spans the server's HTTP work), docs/observe.md."""
    checks = {c.what: c for c in observed[4]}
    assert checks["ttft"].server_count == 20 and checks["itl"].server_count == 20 * 23
    report = json.dumps([c.to_dict() for c in checks.values()])   # a str: pytest prints it whole
    ttft, itl = checks["ttft"], checks["itl"]
    assert ttft.bucket_diff and ttft.agrees, report
    # gaps: the means agree within 2 ms, and at each bound at most 1 % of the 460 gaps lie beyond the slack. Under
    # the full suite's load one chunk now and then is written > 2 ms after its token (seen: 1 of 460 at 25 ms,
    # means 6.554 / 6.553 ms), so a per-sample bound with no allowance flaked in 2 of 4 suites.
    assert itl.bucket_diff and abs(itl.mean_diff_ms) <= 2.0, report
    beyond = max(abs(d) - itl.slack[le] for le, d in itl.bucket_diff.items())
    assert beyond <= 0.01 * itl.server_count, report


def test_grafana_panel_set_reads_what_observe_exports(observed: tuple) -> None:
    """Every query of the shipped eBPF panel set selects metrics this observe run exported: the
    request panels with data from these 20 requests, the capture-health panels with their counters."""
    dash = json.loads((DEPLOY / "grafana" / "observe-ebpf.json").read_text())
    panels = panel_values(dash, parse(observed[2], 0.0))
    assert len(panels) == 11
    for title, values in panels:
        assert values and all(v is not None for v in values.values()), (title, values)
        if "lost" not in title.lower() and "resync" not in title.lower() and "TLS" not in title:
            assert all(v > 0 for v in values.values()), (title, values)
