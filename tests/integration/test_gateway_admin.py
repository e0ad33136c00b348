"""The admin hook the local stack uses to replace a pool's endpoints (desired state)."""

from __future__ import annotations

import asyncio

import httpx

from inferstack.stack.gateway_admin import PoolEndpoint, PoolHook
from support.gateway_procs import start_fake_engines, start_gateway

TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _served(gw, n: int) -> set[str]:
    return {httpx.post(gw.url + "/v1/completions", json={"model": "fake-model", "prompt": f"p{i} " * 30}
                       ).headers["x-gateway-destination-endpoint-served"] for i in range(n)}


def test_stack_pool_hook_replaces_endpoints():
    a, b = start_fake_engines(2)
    gw = start_gateway({"pools": {"default": {"endpoints": [a.url], "models": ["fake-model"]}}},
                       env={"INFERSTACK_ADMIN_TOKEN": TOKEN})
    host = lambda s: s.url.split("//")[1]  # noqa: E731
    try:
        assert _served(gw, 4) == {host(a)}

        async def push(urls: list[str]) -> bool:
            async with httpx.AsyncClient() as client:
                hook = PoolHook(gw.url, client, token=TOKEN)
                return await hook.set_endpoints([PoolEndpoint(u, f"e{i}") for i, u in enumerate(urls)])

        assert asyncio.run(push([a.url, b.url]))
        # a kept endpoint keeps its identity (counters, label); a new one takes the hook's name
        assert _served(gw, 8) == {host(a), "e1"}
        assert asyncio.run(push([b.url]))
        assert _served(gw, 4) == {"e1"}
        pools = httpx.get(gw.url + "/admin/pools", headers=AUTH).json()["pools"]
        assert [e["url"] for e in pools["default"]] == [b.url]
        r = httpx.put(gw.url + "/admin/pools/default/endpoints", json={"endpoints": [{"url": "ftp://x"}]},
                      headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "endpoints"
        r = httpx.put(gw.url + "/admin/pools/nope/endpoints", json={"endpoints": []}, headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "pool_not_found"
    finally:
        gw.stop()
        a.stop()
        b.stop()


def test_pool_load_counts_the_misses_of_the_objectives_the_reader_gives():
    """`GET /admin/pools/{pool}/load?since=T&ttft=S&tpot=S` (what the local actuator asks for its `slo` policy):
    of the requests finished since T, those over either objective; no objectives, no count."""
    (a,) = start_fake_engines(1)
    gw = start_gateway({"pools": {"default": {"endpoints": [a.url], "models": ["fake-model"]}}},
                       env={"INFERSTACK_ADMIN_TOKEN": TOKEN})
    try:
        for i in range(3):
            r = httpx.post(gw.url + "/v1/completions", json={"model": "fake-model", "prompt": f"p{i}", "stream": True})
            assert r.status_code == 200

        def load(query: str) -> httpx.Response:
            return httpx.get(gw.url + "/admin/pools/default/load?" + query, headers=AUTH)

        lenient, strict, none = load("since=0&ttft=60&tpot=60"), load("since=0&ttft=1e-9&tpot=60"), load("since=0")
        assert (lenient.json()["completions"], lenient.json()["missed"]) == (3, 0)
        assert strict.json()["missed"] == 3 and none.json()["missed"] is None
        later = load(f"since={lenient.json()['now']}&ttft=1e-9&tpot=60").json()
        assert later["missed"] == 0                      # none finished since that snapshot
        assert load("since=0&ttft=2").status_code == 400
    finally:
        gw.stop()
        a.stop()
