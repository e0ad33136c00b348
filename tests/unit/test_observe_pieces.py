"""The parts of `inferstack observe` that need no eBPF: the generated program, /proc parsing, the
preflight messages, the CLI's argument errors, metrics and the bench-format report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from typer.testing import CliRunner

from inferstack.bench.compare import compare
from inferstack.cli.main import app
from inferstack.observe import preflight
from inferstack.observe.exchange import ObservedRequest
from inferstack.observe.metrics import ObserveMetrics
from inferstack.observe.program import MAX_IOV, PIECE, ProgramSpec, render
from inferstack.observe.report import CaptureStats, build_result, status_of, write
from inferstack.observe.targets import TargetError, resolve
from inferstack.observe.tracker import Counters


def test_program_watches_only_the_target_and_captures_a_bounded_prefix() -> None:
    text = render(ProgramSpec(pids=(11, 12), listen=((11, 5),), ports=(8000,), seeds=((12, 9),),
                              capture_bytes=3 * PIECE))
    assert "kprobe" not in text                       # this kernel has none: tracepoints only
    assert "@c[(uint64)12, (uint64)9] = 1;" in text and "@l[(uint64)11, (uint64)5] = 1;" in text
    assert "args->sport == 8000" in text
    for call in ("read", "write", "recvfrom", "sendto", "readv", "writev", "recvmsg", "sendmsg", "accept4",
                 "close"):
        assert f"sys_enter_{call} /(pid == 11 || pid == 12)" in text, call
    # every buf() is clamped to bpftrace's string limit, one printf site per syscall (a loop over pieces)
    assert {int(n) for n in re.findall(r"\$k > (\d+)", text)} == {PIECE}
    assert text.count('printf("D ') == 8 and text.count(f"$i < {MAX_IOV}") == 4
    assert text.count(f"$off < {3 * PIECE}") == 8
    plain = render(ProgramSpec(pids=(11,), listen=((11, 5),), ports=(8000,), seeds=(), wire_time=False))
    assert "tcp_probe" not in plain and "@rsk" not in plain and "@wire" not in plain   # older kernels
    with pytest.raises(ValueError, match=f"multiple of {PIECE}"):
        ProgramSpec(pids=(1,), listen=(), ports=(1,), seeds=(), capture_bytes=PIECE + 50)


def _fake_proc(tmp: Path) -> Path:
    (tmp / "net").mkdir()
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    row = "   0: {}:{:04X} 00000000:0000 {} 00000000:00000000 00:00000000 00000000     0        0 {} 1\n"
    (tmp / "net" / "tcp").write_text(head + row.format("0100007F", 8000, "0A", 111)
                                     + row.format("0100007F", 8000, "01", 222)
                                     + row.format("0100007F", 9000, "0A", 333))
    for pid, links in {42: {3: 111, 4: 222, 5: 333}, 43: {3: 111}, 44: {7: 999}}.items():
        fd = tmp / str(pid) / "fd"
        fd.mkdir(parents=True)
        for n, inode in links.items():
            (fd / str(n)).symlink_to(f"socket:[{inode}]")
        (fd / "9").symlink_to("/dev/null")
    return tmp


def test_port_finds_every_holder_and_open_connections(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path)
    t = resolve(None, 8000, proc)
    assert (t.pids, t.ports, t.listen, t.seeds) == ((42, 43), (8000,), ((42, 3), (43, 3)), ((42, 4),))
    t = resolve(42, None, proc)
    assert t.ports == (8000, 9000) and t.listen == ((42, 3), (42, 5))
    with pytest.raises(TargetError, match="no listening TCP socket on port 7"):
        resolve(None, 7, proc)
    with pytest.raises(TargetError, match="no process with pid 99"):
        resolve(99, None, proc)


def test_preflight_names_the_missing_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "privileged", lambda: False)
    with pytest.raises(preflight.PreflightError, match="needs root \\(or CAP_BPF"):
        preflight.check()
    monkeypatch.setattr(preflight, "privileged", lambda: True)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(preflight.PreflightError, match="apt-get install bpftrace"):
        preflight.check()


def test_cli_argument_errors_are_plain_sentences() -> None:
    r = CliRunner().invoke(app, ["observe"])
    assert r.exit_code == 2 and "exactly one of --pid PID or --port PORT" in r.output
    r = CliRunner().invoke(app, ["observe", "--port", "1", "--capture-bytes", "300"])
    assert r.exit_code == 2 and f"multiple of {PIECE}" in r.output


def _req(i: int, **kw: object) -> ObservedRequest:
    base = 10**9 * (i + 1)
    r = ObservedRequest(pid=1, fd=5, method="POST", path="/v1/chat/completions", arrival_ns=base,
                        first_byte_ns=base + 5_000_000, end_ns=base + 50_000_000, status_code=200, streamed=True,
                        chunk_ns=[base + 10_000_000 + k * 5_000_000 for k in range(8)], model="m",
                        prompt_tokens=12, completion_tokens=8)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_metrics_use_the_gateway_names_with_source_ebpf() -> None:
    m = ObserveMetrics("pid=1", lambda: (Counters(segments=7, lost_events=2), 1))
    m.observe(_req(0))
    m.observe(_req(1, status_code=429, chunk_ns=[]))
    text = generate_latest(m.registry).decode()
    assert ('gen_ai_server_time_to_first_token_seconds_sum{endpoint="pid=1",model="m",pool="",source="ebpf",'
            'tenant=""} 0.01') in text
    assert 'inferstack_gateway_requests_total{endpoint="pid=1",model="m",pool="",source="ebpf",status="429",' \
           'tenant=""} 1.0' in text
    assert "inferstack_gateway_inter_token_latency_seconds_count" in text and "_count" in text
    assert re.search(r'inferstack_gateway_tokens_total\{.*type="output".*\} 8\.0', text)
    assert "inferstack_observe_lost_events_total 2.0" in text and "inferstack_observe_desyncs 1.0" in text


def test_report_is_the_bench_format_and_compares(tmp_path: Path) -> None:
    reqs = [_req(0), _req(1), _req(2, error="still running when observation ended"),
            ObservedRequest(pid=1, fd=5, method="GET", path="/metrics", arrival_ns=1)]
    stats = CaptureStats(4.0, 100, 5000, 4000, 0, 0, 3, 0, 0.01, 0.02, None, None, 1, 0)
    res = build_result(reqs, clock0_ns=0, duration_s=4.0, target="pid 1 port 8000", stats=stats)
    write(res, stats, tmp_path, plots=False)
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["requests"]
    assert [r["status"] for r in rows] == ["ok", "ok", "cancelled"]
    assert rows[0]["ttft_s"] == pytest.approx(0.010) and rows[0]["itl_mean_s"] == pytest.approx(0.005)
    assert rows[0]["tpot_s"] == pytest.approx(0.005) and rows[0]["output_tokens"] == 8
    assert data["config"]["source"] == "ebpf" and data["config"]["observe"]["other_requests"] == 1
    assert "| completed / failed | 2 / 1 |" in compare([tmp_path])
    assert "## eBPF capture" in (tmp_path / "report.md").read_text()
    assert status_of(_req(0, status_code=503)) == ("http_503", "")
    assert status_of(_req(0, chunk_ns=[]))[0] == "bad_response"


def test_histogram_crosscheck_against_the_servers_own() -> None:
    """crosscheck.compare on real prometheus_client histograms with different bucket bounds: gaps seen the
    same agree; a TTFT that eBPF sees longer (it spans the server's HTTP work) agrees one-sidedly; one
    that eBPF sees shorter, or a gap shifted past a shared bound, does not."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from inferstack.observe.crosscheck import ENGINE_PAIRS, compare
    from inferstack.telemetry.promtext import parse

    def scrape(name: str, bounds: tuple[float, ...], values: dict[str, list[float]]):
        reg = CollectorRegistry()
        for what, vs in values.items():
            pair = next(p for p in ENGINE_PAIRS if p[0] == what)
            h = Histogram(pair[1 if name == "server" else 2], "h", buckets=bounds, registry=reg)
            for v in vs:
                h.observe(v)
        return parse(generate_latest(reg).decode(), 0.0)

    ttft, gaps = [0.004, 0.012, 0.03], [0.02, 0.02, 0.06]
    server = scrape("server", (0.005, 0.01, 0.02, 0.05, 0.1), {"ttft": ttft, "itl": gaps})
    empty = parse("", 0.0)

    def checks(e_ttft: list[float], e_gaps: list[float]) -> dict:
        ebpf = scrape("ebpf", (0.0025, 0.005, 0.01, 0.025, 0.05), {"ttft": e_ttft, "itl": e_gaps})
        return {c.what: c for c in compare(empty, server, ebpf, {"ttft": e_ttft, "itl": e_gaps})}

    same = checks([t + 0.003 for t in ttft], [g + 0.0005 for g in gaps])
    assert same["ttft"].agrees and same["itl"].agrees
    assert same["ttft"].mean_diff_ms == pytest.approx(3.0) and set(same["itl"].bucket_diff) == {0.005, 0.01, 0.05}
    shorter = checks([t - 0.003 for t in ttft], gaps)
    assert not shorter["ttft"].agrees and shorter["itl"].agrees
    shifted = checks(ttft, [0.02, 0.02, 0.045])                      # 0.06 → 0.045 crosses the 0.05 bound
    assert not shifted["itl"].agrees and shifted["itl"].bucket_diff[0.05] == 1
