"""`inferstack sim run|sweep` end to end through the CLI: bench's report files plus cost and energy,
PD and crash runs, and precise errors (file:line) for bad configs and traces."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from typer.testing import CliRunner

from inferstack.cli.main import app

FLEET = "h100:llama-3-8b"
runner = CliRunner()


def _sim(*args: str):
    return runner.invoke(app, ["sim", "run", "--no-progress", *args])


def test_run_writes_bench_reports_with_cost_and_energy(tmp_path):
    out = tmp_path / "run"
    r = _sim("--fleet", f"{FLEET}=2", "--workload", "synthetic:input=300,output=20", "--rate", "20",
             "--duration", "2", "--seed", "3", "--slo", "ttft=200ms,tpot=50ms", "--out", str(out))
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    s = res["summary"]
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert s["requests"]["completed"] == len(rows) == res["server"]["simulator"]["requests"] > 20
    assert all(int(row["output_tokens"]) == 20 and row["status"] == "ok" for row in rows)
    assert {row["target"] for row in rows} == {"h100-0", "h100-1"}
    assert 0 < s["latency_s"]["ttft"]["p50"] < s["latency_s"]["e2e"]["p50"]
    assert s["slo"]["attainment"] == 1.0
    cost = res["server"]["cost"]
    # two H100s for the run's virtual span at $3/h, idle power at least 90 W each
    span_h = res["server"]["simulator"]["virtual_s"] / 3600
    assert abs(cost["cost"] - 2 * span_h * 3.0) < 1e-9
    assert cost["energy_kwh"] >= 2 * span_h * 0.090 and cost["energy_kwh_per_1m_tokens"] > 0
    report = (out / "report.md").read_text()
    assert "| TTFT |" in report and "## Fleet (simulated)" in report and "kWh per 1M tokens" in report
    assert (out / "latency_cdf.png").stat().st_size > 1000


def test_pd_split_and_a_crash_keep_every_request_accounted_for(tmp_path):
    out = tmp_path / "pd"
    r = _sim("--fleet", f"{FLEET}=3", "--pd", "1p2d", "--workload", "synthetic:input=600,output=16", "--rate", "15",
             "--duration", "3", "--out", str(out), "--no-plots")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["requests"]["failed"] == 0
    decisions = res["server"]["routing_decisions"]
    assert sum(decisions.values()) == res["summary"]["requests"]["sent"]
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert {row["target"] for row in rows} <= {"h100-1", "h100-2"}       # the decode replicas answer

    out = tmp_path / "crash"
    r = _sim("--fleet", f"{FLEET}=3", "--workload", "synthetic:input=300,output=200", "--rate", "20",
             "--duration", "3", "--crash", "0@1.5+0.5", "--routing", "round-robin", "--out", str(out), "--no-plots")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "requests.csv").open()))
    by_status = {s: sum(row["status"] == s for row in rows) for s in {row["status"] for row in rows}}
    assert by_status.get("connection", 0) > 0 and by_status["ok"] > 0      # streams cut by the crash
    assert len({row["index"] for row in rows}) == len(rows)
    late = [row for row in rows if float(row["sent_s"]) > 2.1 and row["status"] == "ok"]
    assert "h100-0" in {row["target"] for row in late}                      # back after the restart


def test_bad_config_trace_and_fleet_name_the_problem(tmp_path):
    cfg = tmp_path / "inferstack.yaml"
    cfg.write_text("version: 1\ngateway:\n  flow_control:\n    max_queued: -1\n")
    r = _sim("--fleet", f"{FLEET}=1", "--config", str(cfg), "--workload", "synthetic", "--rate", "1",
             "--duration", "1", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and f"{cfg}:4" in r.output and "Traceback" not in r.output

    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_tokens": 10, "output_tokens": 5}\n{"timestamp": 1, "input_tokens": }\n')
    r = _sim("--fleet", f"{FLEET}=1", "--workload", str(trace), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and f"{trace}:2" in r.output

    r = _sim("--fleet", "h100:no-such-model=2", "--workload", "synthetic", "--rate", "1", "--duration", "1",
             "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "unknown model 'no-such-model'" in r.output
    r = _sim("--fleet", f"{FLEET}=2", "--pd", "3p", "--workload", "synthetic", "--rate", "1", "--duration", "1",
             "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--pd '3p'" in r.output


def test_sweep_table_and_min_replicas_search(tmp_path):
    out = tmp_path / "sweep"
    r = runner.invoke(app, ["sim", "sweep", "--fleet", f"{FLEET}=1", "--workload", "synthetic:input=600,output=40",
                            "--rate", "60", "--duration", "1.5", "--vary", "routing=round-robin",
                            "--find-min-replicas", "--slo", "ttft_p95=60ms,tpot_p95=12ms", "--out", str(out),
                            "--no-plots"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "sweep.json").read_text())
    found = data["min_replicas"]
    assert set(found) == {"routing=round-robin"} and all(n and n > 1 for n in found.values())
    # the answer is minimal: its run meets the SLO and the run with one replica fewer does not
    for label, n in found.items():
        rows = {row["run"]: row for row in data["runs"]}
        assert rows[f"{label},replicas={n}"]["ttft_p50_ms"] is not None
        below = json.loads((out / "runs" / f"{label},replicas={n - 1}" / "results.json").read_text())
        at = json.loads((out / "runs" / f"{label},replicas={n}" / "results.json").read_text())
        lat_below, lat_at = below["summary"]["latency_s"], at["summary"]["latency_s"]
        assert lat_at["ttft"]["p95"] <= 0.060 and lat_at["tpot"]["p95"] <= 0.012
        assert lat_below["ttft"]["p95"] > 0.060 or lat_below["tpot"]["p95"] > 0.012
    assert "## Fleet cost per run" in (out / "sweep.md").read_text()

    r = runner.invoke(app, ["sim", "sweep", "--fleet", f"{FLEET}=1", "--workload", "synthetic", "--rate", "1",
                            "--duration", "1", "--vary", "colour=red", "--out", str(out)])
    assert r.exit_code == 2 and "--vary 'colour=red'" in r.output


def test_replays_a_slice_of_the_azure_trace_at_its_own_timestamps(tmp_path):
    trace = Path(__file__).parents[1] / "data" / "azure_conv_200.csv"
    out = tmp_path / "azure"
    r = _sim("--fleet", f"{FLEET}=4", "--workload", f"trace:path={trace},limit=60", "--out", str(out), "--no-plots")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "requests.csv").open()))
    src = list(csv.DictReader(trace.open()))[:60]
    assert len(rows) == 60 and all(row["status"] == "ok" for row in rows)
    by_index = sorted(rows, key=lambda row: int(row["index"]))
    # each request asks the trace's lengths: output exactly, prompt = context words + chat template
    for row, rec in zip(by_index, src, strict=True):
        assert int(row["output_tokens"]) == int(rec["GeneratedTokens"])
        assert 0 <= int(row["prompt_tokens"]) - int(rec["ContextTokens"]) <= 10
    sent = [float(row["sent_s"]) for row in by_index]
    assert sent[0] == 0.0 and sent == sorted(sent) and 10 < sent[-1] < 40     # the trace's own arrival times
