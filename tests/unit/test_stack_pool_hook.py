"""The supervisor's pool hook: full desired list per call; a gateway without the hook is left alone."""

from __future__ import annotations

import asyncio
import json

import httpx

from inferstack.stack.gateway_admin import PoolEndpoint, PoolHook


def run(handler, endpoints: list[PoolEndpoint], calls: int = 1) -> tuple[list[bool], list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    async def go() -> list[bool]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
            hook = PoolHook("http://gw:8000/", client)
            return [await hook.set_endpoints(endpoints) for _ in range(calls)]

    return asyncio.run(go()), seen


def test_sends_the_full_ready_list_to_the_pool() -> None:
    eps = [PoolEndpoint("http://127.0.0.1:1", "engine-0"), PoolEndpoint("http://127.0.0.1:2", "engine-1")]
    ok, seen = run(lambda r: httpx.Response(200, json={}), eps)
    assert ok == [True]
    assert seen[0].method == "PUT" and seen[0].url.path == "/admin/pools/default/endpoints"
    assert json.loads(seen[0].content) == {"endpoints": [
        {"url": "http://127.0.0.1:1", "name": "engine-0"},
        {"url": "http://127.0.0.1:2", "name": "engine-1"}]}


def test_gateway_without_the_hook_is_asked_once() -> None:
    ok, seen = run(lambda r: httpx.Response(404, json={"error": {"message": "Unknown path"}}), [], calls=3)
    assert ok == [False, False, False] and len(seen) == 1


def test_unreachable_gateway_is_not_fatal() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    ok, seen = run(refuse, [], calls=2)
    assert ok == [False, False] and len(seen) == 2     # retried next time: it may be restarting
