"""`inferstack bench` against real HTTP servers: the scripted test server (known TTFT/ITL), a failing
server, a stalling server and an unreachable port."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.procs import Server, free_port, inferstack_env
from typer.testing import CliRunner

from inferstack.cli.main import app

runner = CliRunner()


def start_testserver(*args: str) -> Server:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ts-"))
    ready, log_path = tmp / "ready.json", tmp / "log"
    proc = subprocess.Popen([sys.executable, "-m", "inferstack.bench.testserver", "--port", "0",
                             "--ready-file", str(ready), *args], stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT, env=inferstack_env())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ready.exists() and ready.stat().st_size:
            return Server(proc=proc, urls=json.loads(ready.read_text())["urls"], log_path=log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"testserver did not start: {log_path.read_text()}")


@pytest.fixture(scope="module")
def scripted() -> Iterator[Server]:
    srv = start_testserver("--ttft-ms", "40", "--itl-ms", "8", "--model", "scripted")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def instant() -> Iterator[Server]:
    srv = start_testserver()
    yield srv
    srv.stop()


def bench(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["bench", "run", "--no-progress", "--no-plots", *args])
    return res.exit_code, res.output


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_measures_the_scripted_latencies(scripted: Server, tmp_path: Path, endpoint: str) -> None:
    code, output = bench("--target", scripted.url, "--workload", "synthetic:input=32,output=16", "--rate", "10",
                         "--duration", "2", "--endpoint", endpoint, "--out", str(tmp_path),
                         "--slo", "ttft=200ms,tpot=30ms")
    assert code == 0, output
    s = results(tmp_path)["summary"]
    assert s["requests"]["failed"] == 0 and s["requests"]["completed"] >= 10
    lat = s["latency_s"]
    assert 0.040 <= lat["ttft"]["p50"] < 0.060
    assert lat["tpot"]["p50"] == pytest.approx(0.008, abs=0.0015)
    # every gap between two tokens is one ITL sample, and they average the script's 8 ms; not the p50: on a loaded
    # machine the client reads two chunks in one wake-up now and then (one gap ~0, the next ~16 ms), which moves
    # the median of a 2 s run while the mean, the same time split over the same gaps, stays
    assert lat["itl"]["count"] == 15 * s["requests"]["completed"]
    assert lat["itl"]["mean"] == pytest.approx(0.008, abs=0.002)
    assert lat["e2e"]["p50"] == pytest.approx(0.040 + 15 * 0.008, abs=0.02)
    assert s["tokens"]["output_total"] == 16 * s["requests"]["completed"]
    # attainment is the share of the run's requests whose own TTFT and TPOT meet both limits: recomputed from the
    # per-request rows, not a floor, since a loaded CI machine stalls a few of 16 streams past 30 ms a token (0.81 once)
    rows = [r for r in results(tmp_path)["requests"] if r["included"]]
    meeting = [r for r in rows if r["ttft_s"] is not None and r["ttft_s"] <= 0.2 and r["tpot_s"] <= 0.03]
    assert s["slo"]["attainment"] == pytest.approx(len(meeting) / len(rows))
    assert s["slo"]["met"] == (len(meeting) / len(rows) >= 0.95)
    assert len(meeting) > len(rows) / 2
    assert "guidellm TPOT" in (tmp_path / "report.md").read_text()


def test_open_loop_rate_does_not_drift(instant: Server, tmp_path: Path) -> None:
    code, output = bench("--target", instant.url, "--workload", "synthetic:input=16,output=2", "--rate", "300",
                         "--arrival", "constant", "--duration", "3", "--no-stream", "--out", str(tmp_path))
    assert code == 0, output
    s = results(tmp_path)["summary"]
    assert s["requests"]["sent"] == 900 and s["requests"]["failed"] == 0
    # 5 %: a loaded CI-sized machine measured 292 req/s (2.7 % low) once; a loop that sleeps 1/rate after each send
    # drifts by its per-send overhead (~10 % at 300/s), which this still catches
    assert s["load"]["send_rate"] == pytest.approx(300, rel=0.05)
    assert s["throughput"]["requests_per_s"] == pytest.approx(300, rel=0.05)


def test_concurrency_mode_multi_turn_and_reports(scripted: Server, tmp_path: Path) -> None:
    code, output = bench("--target", scripted.url, "--workload", "multi-turn:turns=3,input=8,output=4",
                         "--concurrency", "4", "--duration", "1.5", "--scrape-interval", "0.2", "--out", str(tmp_path))
    assert code == 0, output
    data = results(tmp_path)
    stages = {r["stage"] for r in data["requests"]}
    assert stages == {0, 1, 2}
    ins = {r["stage"]: r["prompt_tokens"] for r in data["requests"] if r["unit"] == 0}
    assert ins[0] < ins[1] < ins[2]
    assert (tmp_path / "requests.csv").read_text().count("\n") == len(data["requests"]) + 1
    assert data["server"]["available"] and data["server"]["vllm:num_requests_running"]["max"] >= 1


def test_warmup_and_cooldown_are_excluded(instant: Server, tmp_path: Path) -> None:
    code, output = bench("--target", instant.url, "--workload", "synthetic:input=8,output=2", "--rate", "50",
                         "--arrival", "constant", "--duration", "2", "--warmup", "0.5", "--cooldown", "0.5",
                         "--out", str(tmp_path))
    assert code == 0, output
    s = results(tmp_path)["summary"]
    assert s["requests"]["sent"] == 50 and s["requests"]["excluded_warmup_cooldown"] == 50


def test_unreachable_target_is_a_clear_error(tmp_path: Path) -> None:
    code, output = bench("--target", f"http://127.0.0.1:{free_port()}", "--workload", "synthetic", "--rate", "1",
                         "--duration", "1", "--out", str(tmp_path))
    assert code == 2 and "cannot reach target" in output


def test_bad_workload_file_names_the_line(instant: Server, tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "input_tokens": 4, "output_tokens": 2}\n{"timestamp": 1,\n')
    code, output = bench("--target", instant.url, "--workload", str(trace), "--out", str(tmp_path / "o"))
    assert code == 2 and "bad.jsonl:2: invalid JSON" in output


def test_impossible_slo_is_a_clear_error(instant: Server, tmp_path: Path) -> None:
    code, output = bench("--target", instant.url, "--workload", "synthetic", "--goodput", "ttft=2s,e2e=1s",
                         "--duration", "1", "--out", str(tmp_path))
    assert code == 2 and "impossible SLO" in output


def test_erroring_server_is_reported(tmp_path: Path) -> None:
    srv = start_testserver("--mode", "error")
    try:
        code, output = bench("--target", srv.url, "--workload", "synthetic:input=8,output=2", "--rate", "20",
                             "--duration", "1", "--out", str(tmp_path))
    finally:
        srv.stop()
    assert code == 1 and "every request failed" in output
    s = results(tmp_path)["summary"]
    assert set(s["requests"]["by_status"]) == {"http_500"}
    assert "scripted failure" in s["errors_sample"][0]["error"]


def test_stalling_server_is_reported_not_hung_on(tmp_path: Path) -> None:
    srv = start_testserver("--mode", "stall")
    try:
        t0 = time.monotonic()
        code, output = bench("--target", srv.url, "--workload", "synthetic:input=8,output=2", "--rate", "10",
                             "--arrival", "constant", "--duration", "1", "--stall-timeout", "1", "--out", str(tmp_path))
        took = time.monotonic() - t0
    finally:
        srv.stop()
    assert code == 1 and took < 10, output
    assert results(tmp_path)["summary"]["requests"]["by_status"] == {"stalled": 10}


def test_trace_replay_uses_trace_timestamps(instant: Server, tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp,input_tokens,output_tokens\n" + "".join(f"{i * 0.1:.1f},8,2\n" for i in range(10)))
    code, output = bench("--target", instant.url, "--workload", f"trace:path={trace}", "--out", str(tmp_path / "o"))
    assert code == 0, output
    reqs = results(tmp_path / "o")["requests"]
    assert len(reqs) == 10
    assert [round(r["scheduled_s"], 3) for r in reqs] == [round(i * 0.1, 3) for i in range(10)]


def test_goodput_search_and_compare(scripted: Server, tmp_path: Path) -> None:
    # The SLO sits 50x above the script's 40 ms TTFT: this test is about the search's runs, files and compare (the
    # search itself is unit-tested), and a loaded CI machine once put 2 of 16 first tokens past a 150 ms SLO.
    code, output = bench("--target", scripted.url, "--workload", "synthetic:input=8,output=4",
                         "--goodput", "ttft=2s,attainment=0.9", "--rate", "8", "--duration", "1",
                         "--goodput-max-runs", "2", "--out", str(tmp_path))
    assert code == 0, output
    series = json.loads((tmp_path / "goodput.json").read_text())
    assert series["max_rate_meeting_slo"] == 16 and len(series["runs"]) == 2
    assert (tmp_path / "goodput.png").stat().st_size > 1000
    runs = sorted((tmp_path / "runs").iterdir())
    res = runner.invoke(app, ["bench", "compare", *map(str, runs[:2])])
    assert res.exit_code == 0 and "TTFT p50 (ms)" in res.output and runs[0].name in res.output
    bad = runner.invoke(app, ["bench", "compare", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "no results.json" in bad.output


def test_sweep_runs_up_to_saturation(scripted: Server, tmp_path: Path) -> None:
    code, output = bench("--target", scripted.url, "--workload", "synthetic:input=8,output=4", "--sweep",
                         "--sweep-points", "2", "--sweep-concurrency", "4", "--duration", "1",
                         "--out", str(tmp_path))
    assert code == 0, output
    series = json.loads((tmp_path / "sweep.json").read_text())
    sat = series["saturation_requests_per_s"]
    assert sat > 10            # 4 in flight, each 40 ms + 3·8 ms
    rates = [r["target_rate"] for r in series["runs"]]
    assert rates == [sat / 2, sat] or rates == [sat * 0.5, sat * 1.0]
    assert (tmp_path / "sweep.png").stat().st_size > 1000 and (tmp_path / "runs" / "saturation" / "report.md").exists()
