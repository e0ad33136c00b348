"""`inferstack compliance verify-log`: exit code and messages scripts rely on."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.compliance.audit import AuditLog, AuditRecord
from inferstack.compliance.config import AuditConfig


def _log(tmp_path: Path) -> Path:
    cfg = AuditConfig(directory=tmp_path / "a", fsync=False)
    with AuditLog(cfg) as log:
        for i in range(3):
            log.append_nowait(AuditRecord(model="m", status=200, latency_ms=i))
    return cfg.directory


def test_verify_log_ok_and_tampered(tmp_path: Path) -> None:
    d = _log(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["compliance", "verify-log", str(d)])
    assert ok.exit_code == 0, ok.output
    assert "intact: 3 records" in ok.output
    as_json = runner.invoke(app, ["compliance", "verify-log", str(d), "--json"])
    assert json.loads(as_json.output)["ok"] is True
    f = d / "audit.jsonl"
    f.write_text(f.read_text().replace('"latency_ms":1', '"latency_ms":9'))
    bad = runner.invoke(app, ["compliance", "verify-log", str(d)])
    assert bad.exit_code == 1
    assert "audit.jsonl:2" in bad.output and "edited" in bad.output and "TAMPERED" in bad.output


def test_verify_log_names_an_unfinished_last_line_torn(tmp_path: Path) -> None:
    d = _log(tmp_path)
    with (d / "audit.jsonl").open("ab") as f:
        f.write(b'{"seq":3,"pre')           # what a crash mid-write leaves
    res = CliRunner().invoke(app, ["compliance", "verify-log", str(d)])
    assert res.exit_code == 1 and "TORN" in res.output and "TAMPERED" not in res.output
    with AuditLog(AuditConfig(directory=d, fsync=False)):   # the next start cuts it and records that
        pass
    res = CliRunner().invoke(app, ["compliance", "verify-log", str(d)])
    assert res.exit_code == 0 and "intact: 4 records" in res.output


def test_verify_log_missing_path(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["compliance", "verify-log", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_report_from_inferstack_yaml(tmp_path: Path) -> None:
    audit_dir = _log(tmp_path)
    cfg = tmp_path / "inferstack.yaml"
    cfg.write_text(
        "pools:\n"
        "  chat: {endpoints: ['http://127.0.0.1:9'], model_digest: 'sha256:" + "a" * 64 + "'}\n"
        "  embed: {endpoints: ['http://127.0.0.1:10']}\n"
        f"audit: {{directory: '{audit_dir}'}}\n"
        "trust: {require_signature: true}\n"
    )
    res = CliRunner().invoke(app, ["compliance", "report", "--config", str(cfg), "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["gateway_pools"] == {"chat": "sha256:" + "a" * 64, "embed": None}
    assert data["logging"]["chain"]["ok"] is True and data["logging"]["request_records"] == 3
    items = {i["article"]: i for i in data["checklist"]}
    assert items["Art. 12(1)"]["status"] == "pass"
    assert items["Art. 12(2)(a)"]["status"] == "fail" and "embed" in items["Art. 12(2)(a)"]["evidence"]
    assert items["Art. 50(2)"]["status"] == "manual" and items["Art. 13(3)(f)"]["status"] == "manual"
    # derived from the records: these lack tenant, key id, digest and token counts
    monitoring = items["Art. 12(2)(b)-(c)"]
    assert monitoring["status"] == "fail" and "tenant (3 records)" in monitoring["evidence"]
    html = CliRunner().invoke(app, ["compliance", "report", "--config", str(cfg), "--format", "html",
                                    "--out", str(tmp_path / "r.html")])
    assert html.exit_code == 0 and (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    bad = tmp_path / "bad.yaml"
    bad.write_text("audit:\n  retention_days: 7\n")
    res = CliRunner().invoke(app, ["compliance", "report", "--config", str(bad)])
    assert res.exit_code == 2 and "bad.yaml:2" in res.output


def test_monitoring_item_passes_only_on_complete_records(tmp_path: Path) -> None:
    from inferstack.compliance.report import CheckItem, checklist, logging_evidence
    from inferstack.modelhub.policy import TrustPolicy

    cfg = AuditConfig(directory=tmp_path / "a", fsync=False)

    def item() -> CheckItem:
        items = checklist([], logging_evidence(cfg), TrustPolicy(), {})
        return next(i for i in items if i.article == "Art. 12(2)(b)-(c)")

    with AuditLog(cfg) as log:
        log.append_nowait(AuditRecord(status=401, latency_ms=1.0, error="invalid_api_key"))
    assert item().status == "manual"                  # nothing served yet: nothing to judge
    with AuditLog(cfg) as log:
        log.append_nowait(AuditRecord(model="m", status=200, latency_ms=3.0, tenant="t", key_id="k",
                                      model_digest="sha256:" + "b" * 64, prompt_tokens=5, completion_tokens=2))
    assert item().status == "pass"
