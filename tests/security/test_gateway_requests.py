"""Replayed probes (issue 19, items 2, 3, 7, 8, 9) against a real gateway over a fake engine:
what a client may not decide (priority, KV transfer peers), bodies and headers the gateway must
refuse cleanly, and connections that trickle bytes to hold the server."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from inferstack.gateway.auth import hash_key
from support.audit_records import wait_for_record
from support.gateway_procs import start_fake_engine, start_gateway

BATCH_KEY, STD_KEY = "k-batch", "k-std"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit")
    engine = start_fake_engine("--tokens", "2")
    gw = start_gateway({
        "gateway": {"http": {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "max_prompts": 8}},
        "pools": {"p": {"endpoints": [engine.url], "models": ["fake-model"]}},
        "objectives": {"batch": {"priority": -1}, "high": {"priority": 10}},
        "keys": [{"sha256": hash_key(BATCH_KEY), "tenant": "t", "objective": "batch"},
                 {"sha256": hash_key(STD_KEY), "tenant": "t", "max_objective": "high"}],
        "audit": {"directory": str(audit), "fsync": False},
    })
    yield engine, gw, audit
    gw.stop()
    engine.stop()


def _engine_body(engine, marker: str) -> dict:
    bodies = httpx.get(engine.url + "/debug/requests").json()["bodies"]
    found = [b for b in bodies if marker in json.dumps(b.get("messages") or b.get("prompt"))]
    assert len(found) == 1, found
    return found[0]


def _chat(gw, key: str, marker: str, headers: dict | None = None, **extra) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions",
                      headers={"authorization": f"Bearer {key}", **(headers or {})},
                      json={"model": "fake-model", "messages": [{"role": "user", "content": marker}],
                            **extra})


def test_the_gateway_owns_priority_and_kv_transfer_params(stack):
    engine, gw, _ = stack
    # a sheddable key asks for the top priority in the body and through an objective it may not use
    r = _chat(gw, BATCH_KEY, "m-batch", {"x-gateway-inference-objective": "high"}, priority=-1_000_000,
              kv_transfer_params={"do_remote_prefill": True, "remote_host": "10.9.9.9", "remote_port": 9})
    assert r.status_code == 200, r.text
    body = _engine_body(engine, "m-batch")
    assert body["priority"] == 1  # gateway priority -1 (its key's objective); engines serve lower first
    assert "kv_transfer_params" not in body
    # a key allowed `high` gets it; without an objective a client's own `priority` is dropped
    assert _chat(gw, STD_KEY, "m-high", {"x-gateway-inference-objective": "high"}).status_code == 200
    assert _engine_body(engine, "m-high")["priority"] == -10
    assert _chat(gw, STD_KEY, "m-plain", priority=-5).status_code == 200
    assert "priority" not in _engine_body(engine, "m-plain")


def test_missing_model_is_a_400_like_openai(stack):
    _, gw, _ = stack
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {STD_KEY}"},
                   json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    # a megabyte of model name is not echoed back (nor written into the audit log)
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {STD_KEY}"},
                   json={"model": "m" * (1 << 20), "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and len(r.content) < 1024, r.status_code


def test_json_nested_too_deep_to_forward_is_an_audited_400(stack):
    _, gw, audit = stack
    for depth in (254, 600, 1024):
        nested = "[" * depth + "]" * depth
        body = '{"model":"fake-model","messages":[{"role":"user","content":"x"}],"metadata":' + nested + "}"
        rid = f"deep-{depth}"
        r = httpx.post(gw.url + "/v1/chat/completions", content=body,
                       headers={"authorization": f"Bearer {STD_KEY}", "content-type": "application/json",
                                "x-request-id": rid})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (depth, r.text)
        assert wait_for_record(audit, rid)["status"] == 400


def test_prompts_times_n_is_capped(stack):
    engine, gw, _ = stack
    auth = {"authorization": f"Bearer {STD_KEY}"}
    r = httpx.post(gw.url + "/v1/completions", headers=auth,
                   json={"model": "fake-model", "prompt": [f"p{i}" for i in range(1000)], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_completions", r.text
    r = httpx.post(gw.url + "/v1/completions", headers=auth,
                   json={"model": "fake-model", "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})
    assert r.status_code == 400, r.text  # 9 completions > 8
    r = httpx.post(gw.url + "/v1/completions", headers=auth,
                   json={"model": "fake-model", "prompt": ["cap-a", "cap-b"], "n": 4, "max_tokens": 1})
    assert r.status_code == 200, r.text  # 8 completions: at the cap, forwarded whole
    body = _engine_body(engine, "cap-b")
    assert body["prompt"] == ["cap-a", "cap-b"] and body["n"] == 4


def test_request_id_is_cleaned_and_bounded(stack):
    _, gw, audit = stack
    hostile = "evil <script>" + "A" * 60_000  # under the 64 KiB header cap
    r = _chat(gw, STD_KEY, "m-rid", {"x-request-id": hostile})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert len(rid) == 128 and rid.startswith("evil__script_AAA"), rid
    assert wait_for_record(audit, rid)["status"] == 200


def test_headers_over_64_kib_get_431(stack):
    _, gw, _ = stack
    big = {"x-filler": "a" * (70 << 10)}
    r = httpx.post(gw.url + "/v1/chat/completions", headers=big, json={"model": "fake-model", "messages": []})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    # one endless header: refused once 64 KiB arrived, the rest is never buffered
    with socket.create_connection(_addr(gw)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"b" * (1 << 20))
        assert _read_until_closed(s, 5).startswith(b"HTTP/1.1 431")


def test_slow_headers_and_slow_bodies_are_cut_off(stack):
    _, gw, _ = stack
    t0 = time.monotonic()
    with socket.create_connection(_addr(gw)) as s:  # slowloris: headers that never end
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        head = _read_until_closed(s, 5)
    assert head.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 4, head
    t0 = time.monotonic()
    with socket.create_connection(_addr(gw)) as s:  # a body that stops halfway
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"authorization: Bearer " + STD_KEY.encode()
                  + b"\r\ncontent-length: 1000\r\n\r\n{\"model\":")
        head = _read_until_closed(s, 5)
    assert head.startswith(b"HTTP/1.1 408") and b"body_timeout" in head, head
    assert time.monotonic() - t0 < 4


def _addr(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _read_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data
