"""Replayed probe (issue 19, item 1): the disk under the audit directory refuses writes mid-run.

A child process writes the audit log under a file-size limit (RLIMIT_FSIZE: the kernel answers
EFBIG after a partial write, exactly like a full disk answers ENOSPC), then lifts the limit. The
writer must report itself unhealthy while it cannot write, keep every record, cut the torn bytes,
resume by itself and leave a chain that `compliance verify-log` accepts, with the repair recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.compliance.chain import ACTIVE_NAME

CHILD = textwrap.dedent('''
    import json, os, resource, signal, sys, time
    from pathlib import Path
    from inferstack.compliance.audit import AuditLog, AuditRecord
    from inferstack.compliance.config import AuditConfig

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as ENOSPC would be
    directory = Path(sys.argv[1])
    log = AuditLog(AuditConfig(directory=directory, retry_max_s=0.05, on_failure=sys.argv[2]))

    def wait_until(cond):
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.01)

    def record(i):
        log.append_nowait(AuditRecord(model="m", status=200, latency_ms=1.0, request_id=f"r{i}"))

    for i in range(3):
        record(i)
    log.flush()
    size = (directory / "audit.jsonl").stat().st_size
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 60, hard))  # room for part of one line only
    for i in range(3, 8):
        record(i)
    wait_until(lambda: not log.healthy)
    during = {"healthy": log.healthy, "admits": log.admits_requests, "failure": log.failure,
              "size": (directory / "audit.jsonl").stat().st_size, "good": size}
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space returns
    wait_until(lambda: log.healthy)
    log.flush()
    log.close()
    print(json.dumps(during))
''')


def _run_child(tmp_path: Path, on_failure: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "audit"), on_failure], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_writer_refuses_while_the_disk_is_full_then_resumes_and_records_the_repair(tmp_path: Path) -> None:
    during = _run_child(tmp_path, "refuse")
    assert during["healthy"] is False and during["admits"] is False
    assert "errno" in during["failure"]
    assert during["size"] == during["good"], "the torn partial line must be cut while the disk refuses writes"
    lines = [json.loads(x) for x in (tmp_path / "audit" / ACTIVE_NAME).read_text().splitlines()]
    requests = [r["request_id"] for r in lines if r["type"] == "request"]
    assert requests == [f"r{i}" for i in range(8)], "no record may be lost across the outage"
    recovery = [r for r in lines if r["type"] == "recovery"]
    # each failed write tore off the 60 bytes the limit let through, and each tear was cut (a loaded machine lets the
    # writer retry more than once before the test lifts the limit)
    assert len(recovery) == 1 and recovery[0]["failed_writes"] >= 1
    assert recovery[0]["torn_bytes_removed"] == 60 * recovery[0]["failed_writes"], recovery[0]
    result = CliRunner().invoke(app, ["compliance", "verify-log", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    assert "audit log intact: 9 records" in result.output


def test_serve_and_alert_keeps_admitting_while_unhealthy(tmp_path: Path) -> None:
    during = _run_child(tmp_path, "serve_and_alert")
    assert during["healthy"] is False and during["admits"] is True


START_FULL = textwrap.dedent('''
    import json, resource, signal, sys, time
    from pathlib import Path
    from inferstack.compliance.audit import AuditLog
    from inferstack.compliance.config import AuditConfig

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    directory = Path(sys.argv[1])
    active = directory / "audit.jsonl"
    with AuditLog(AuditConfig(directory=directory)) as log:
        log.event("model.loaded", model="m")
    with active.open("ab") as f:
        f.write(b'{"seq":1,"pre')                      # a crash mid-write
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (active.stat().st_size - 13, hard))  # and the disk is full
    log = AuditLog(AuditConfig(directory=directory, retry_max_s=0.05))   # must start, not raise
    started_healthy = log.healthy
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    deadline = time.monotonic() + 10
    while not log.healthy:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    log.close()
    print(json.dumps({"started_healthy": started_healthy}))
''')


def test_a_full_disk_at_start_leaves_the_writer_unhealthy_instead_of_failing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    out = subprocess.run([sys.executable, "-c", START_FULL, str(tmp_path / "audit")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"started_healthy": False}
    lines = [json.loads(x) for x in (tmp_path / "audit" / ACTIVE_NAME).read_text().splitlines()]
    assert [r["type"] for r in lines] == ["model.loaded", "recovery", "recovery"]
    assert lines[1]["reason"] == "torn_tail_at_start" and lines[1]["torn_bytes_removed"] == 13
    assert lines[2]["reason"] == "write_failed"
    assert CliRunner().invoke(app, ["compliance", "verify-log", str(tmp_path / "audit")]).exit_code == 0
