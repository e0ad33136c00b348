"""Two gateway replicas sharing one real redis-server enforce one RPM/TPM limit."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
import redis

from inferstack.gateway.auth import hash_key
from support.gateway_procs import start_fake_engine, start_gateway
from support.procs import free_port


@pytest.fixture(scope="module")
def redis_url():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


def test_two_replicas_share_one_limit(redis_url):
    engine = start_fake_engine("--tokens", "50")
    cfg = {
        "gateway": {"redis_url": redis_url},
        "pools": {"p": {"endpoints": [engine.url], "models": ["fake-model"]}},
        "keys": [{"sha256": hash_key("k-rpm"), "tenant": "rpm-tenant"},
                 {"sha256": hash_key("k-tpm"), "tenant": "tpm-tenant"}],
        "tenants": {"rpm-tenant": {"rpm": 10}, "tpm-tenant": {"tpm": 300}},
    }
    gws = [start_gateway(cfg), start_gateway(cfg)]
    try:
        def ask(i: int, key: str) -> httpx.Response:
            return httpx.post(gws[i % 2].url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}]})

        rs = [ask(i, "k-rpm") for i in range(20)]
        ok = [r for r in rs if r.status_code == 200]
        limited = [r for r in rs if r.status_code == 429]
        # one limit of 10/min across both replicas (a per-replica limit would admit 20)
        assert 10 <= len(ok) <= 11, [r.status_code for r in rs]
        assert len(ok) + len(limited) == 20
        assert {r.json()["error"]["code"] for r in limited} == {"rpm_limit_exceeded"}
        assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
        # TPM: each answer uses ~53 tokens (usage), charged after the fact across both replicas
        tpm = [ask(i, "k-tpm").status_code for i in range(12)]
        assert tpm.count(200) in (5, 6, 7), tpm
        assert tpm[-1] == 429
    finally:
        for g in gws:
            g.stop()
        engine.stop()
