"""Replayed probe (issue 19, item 1, the gateway's side): the disk under the audit log refuses
writes while the gateway serves. Before, requests kept getting 200 with no record and /ready stayed
200. Now admission checks the writer's health: 503 with the envelope and Retry-After, /ready 503
and a metric while it cannot write, and service resumes by itself when the disk takes writes again.

The disk is "filled" with RLIMIT_FSIZE set on the running gateway (prlimit): the kernel then answers
EFBIG, as a full disk answers ENOSPC (the gateway ignores SIGXFSZ, the signal that comes with it).
"""

from __future__ import annotations

import json
import resource
import signal
import time
from pathlib import Path

import httpx

from support.gateway_procs import start_fake_engine, start_gateway
from support.procs import metric_sum


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _wait(cond, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_gateway_refuses_while_the_audit_log_cannot_write_and_resumes_after(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    engine = start_fake_engine("--tokens", "2")
    gw = start_gateway({"pools": {"p": {"endpoints": [engine.url], "models": ["fake-model"]}},
                        "audit": {"directory": str(audit), "fsync": False, "retry_max_s": 0.05}},
                       preexec_fn=_ignore_sigxfsz)
    log = audit / "audit.jsonl"
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def ask(rid: str) -> httpx.Response:
        return httpx.post(gw.url + "/v1/chat/completions", headers={"x-request-id": rid},
                          json={"model": "fake-model", "messages": [{"role": "user", "content": rid}]})

    try:
        assert ask("before").status_code == 200
        _wait(lambda: log.exists() and b'"before"' in log.read_bytes(), "first record on disk")
        resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (log.stat().st_size + 40, hard))  # disk full
        assert ask("unrecorded-yet").status_code == 200  # admitted: its record fails after the response
        polls = iter(range(1000))  # one id per try: tries before the writer noticed are served (200)
        refused = _wait(lambda: (r := ask(f"during-{next(polls)}")).status_code == 503 and r,
                        "admission refuses")
        assert refused.json()["error"]["code"] == "audit_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        ready = httpx.get(gw.url + "/ready")
        assert ready.status_code == 503 and "audit log" in ready.json()["status"]
        metrics = httpx.get(gw.url + "/metrics").text
        assert metric_sum(metrics, "inferstack_audit_writer_healthy") == 0
        name = "inferstack_gateway_dependency_unavailable_total"
        assert metric_sum(metrics, name, 'dependency="audit_log"') >= 1
        resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space returns
        _wait(lambda: ask("after").status_code == 200, "admits again")
        assert httpx.get(gw.url + "/ready").status_code == 200
        # the log says when writing stopped and when it resumed (lines written while the file-size
        # limit held may be lost from the gateway's own log file, so check the resumption)
        assert "audit log writes again" in gw.log()
    finally:
        gw.stop()
        engine.stop()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ids = [r.get("request_id") for r in records]
    # nothing answered went unrecorded: the record that failed was kept and written on recovery,
    # the refusals are recorded too, and the chain says it was repaired
    assert {"before", "unrecorded-yet", "after"} <= set(ids), ids
    during = [r for r in records if str(r.get("request_id")).startswith("during-")]
    assert during and during[-1]["status"] == 503 and during[-1]["error"] == "audit_unavailable", during
    assert any(r["type"] == "recovery" for r in records)
