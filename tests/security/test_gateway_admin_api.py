"""Replayed probe (issue 19, item 5): the admin API repointed a pool for anyone who asked, with any
Host header, and answered an https:// endpoint with a raw 500."""

from __future__ import annotations

import httpx
import pytest

from inferstack.stack.settings import UpSettings
from inferstack.stack.supervisor import Supervisor
from support.gateway_procs import start_fake_engine, start_gateway

TOKEN = "stack-secret-for-tests"
PUT = "/admin/pools/default/endpoints"


@pytest.fixture(scope="module")
def servers():
    engine = start_fake_engine()
    cfg = {"pools": {"default": {"endpoints": [engine.url], "models": ["fake-model"]}}}
    guarded = start_gateway(cfg, env={"INFERSTACK_ADMIN_TOKEN": TOKEN})
    tokenless = start_gateway(cfg)
    yield engine, guarded, tokenless
    tokenless.stop()
    guarded.stop()
    engine.stop()


def _pool_urls(gw) -> list[str]:
    r = httpx.get(gw.url + "/admin/pools", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return [e["url"] for e in r.json()["pools"]["default"]]


def test_admin_api_needs_the_token_and_a_loopback_host(servers):
    engine, gw, _ = servers
    evil = {"endpoints": [{"url": "http://127.0.0.1:9"}]}
    r = httpx.put(gw.url + PUT, json=evil)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
    r = httpx.put(gw.url + PUT, json=evil, headers={"authorization": "Bearer guess"})
    assert r.status_code == 401
    assert httpx.get(gw.url + "/admin/pools").status_code == 401  # the pool list names internal hosts
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1
    rebound = {"authorization": f"Bearer {TOKEN}", "host": "evil.example"}
    r = httpx.put(gw.url + PUT, json=evil, headers=rebound)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_host_not_allowed"
    assert _pool_urls(gw) == [engine.url]


def test_an_endpoint_url_the_pool_cannot_use_is_a_clear_400(servers):
    engine, gw, _ = servers
    r = httpx.put(gw.url + PUT, json={"endpoints": [{"url": "https://127.0.0.1:8443"}]},
                  headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_endpoint" and "https://" in err["message"] and err["param"] == "endpoints"
    assert _pool_urls(gw) == [engine.url]


def test_unknown_endpoint_fields_are_refused_not_dropped(servers):
    engine, gw, _ = servers
    r = httpx.put(gw.url + PUT, json={"endpoints": [{"url": engine.url, "model": "other-model"}]},
                  headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"], r.text
    assert _pool_urls(gw) == [engine.url]


def test_without_a_token_the_admin_api_is_off(servers):
    _, _, tokenless = servers
    r = httpx.put(tokenless.url + PUT, json={"endpoints": [{"url": "http://127.0.0.1:9"}]})
    assert r.status_code == 404
    assert "INFERSTACK_ADMIN_TOKEN" in tokenless.log()


def test_the_supervisor_gives_gateway_and_hook_one_fresh_secret(tmp_path):
    a, b = (Supervisor(UpSettings(log_dir=str(tmp_path / name))) for name in ("a", "b"))
    assert a._gateway_env["INFERSTACK_ADMIN_TOKEN"] == a._admin_token
    assert len(a._admin_token) >= 32 and a._admin_token != b._admin_token
    assert "INFERSTACK_ADMIN_TOKEN" not in a._env  # engines and other children never see it
