"""Every gateway request leaves one record in the hash-chained audit log (real gateway process, fake engines)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.compliance.chain import segments, verify_chain
from inferstack.gateway.auth import hash_key
from support.gateway_procs import start_fake_engine, start_gateway

KEY = "sk-audited-tenant-0123456789"
KEY_SMALL = "sk-audited-limited-0123456789"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture()
def audited(tmp_path: Path):
    engine = start_fake_engine("--model", "fake-model", "--ttft-ms", "1", "--tokens", "3")
    cfg = {
        "pools": {"fakes": {"endpoints": [engine.url], "model_digest": DIGEST}},
        "models": {"chat-model": {"targets": [{"pool": "fakes", "model": "fake-model"}]}},
        "keys": [{"sha256": hash_key(KEY), "tenant": "acme", "name": "acme-prod"},
                 {"sha256": hash_key(KEY_SMALL), "tenant": "acme", "models": ["other"]}],
        "audit": {"directory": str(tmp_path / "audit"), "fsync": False},
    }
    gw = start_gateway(cfg)
    yield gw, tmp_path / "audit"
    gw.stop()
    engine.stop()


def _records(directory: Path) -> list[dict]:
    return [json.loads(line) for seg in segments(directory) for line in seg.read_text().splitlines()]


def test_each_request_is_audited_and_the_chain_verifies(audited) -> None:
    gw, audit_dir = audited
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.post(f"{gw.url}/v1/chat/completions", headers={**auth, "x-request-id": "req-1"},
                    json={"model": "chat-model", "messages": [{"role": "user", "content": "secret prompt"}]})
    assert ok.status_code == 200
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers=auth,
                      json={"model": "chat-model", "stream": True,
                            "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.status_code == 200 and r.read()
    assert httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                      json={"model": "chat-model", "messages": []}).status_code == 401
    assert httpx.post(f"{gw.url}/v1/chat/completions", headers=auth,
                      json={"model": "nope", "messages": []}).status_code == 404
    assert httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_SMALL}"},
                      json={"model": "chat-model", "messages": []}).status_code == 403
    gw.stop()  # SIGTERM: the gateway flushes the audit log on shutdown

    recs = _records(audit_dir)
    assert [r["status"] for r in recs] == [200, 200, 401, 404, 403]
    first = recs[0]
    assert first["request_id"] == "req-1" and first["tenant"] == "acme" and first["key_id"] == "acme-prod"
    assert first["model"] == "chat-model" and first["model_digest"] == DIGEST
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] == 3 and first["latency_ms"] > 0
    assert "prompt" not in first and len(first["prompt_sha256"]) == 64  # prompt text is off by default
    assert "secret prompt" not in (audit_dir / "audit.jsonl").read_text()
    assert recs[1]["completion_tokens"] == 3  # streamed: counted from the usage event
    assert "tenant" not in recs[2] and recs[2]["error"] == "invalid_api_key"
    assert recs[3]["model"] == "nope" and recs[4]["key_id"] == hash_key(KEY_SMALL)[:12]
    assert verify_chain(audit_dir).ok
    res = CliRunner().invoke(app, ["compliance", "verify-log", str(audit_dir)])
    assert res.exit_code == 0 and "5 records" in res.output
