"""Flow control's per-endpoint hold (issue 21), through real processes (fake engines, the gateway): an
engine saturated by a hot tenant must not hold back requests the router sends to idle engines. Before
the hold, the pool's room was the signed sum of the endpoints' rooms, so the hot engine's overflow
cancelled the idle engines' room and everyone waited at the pool until the hot engine drained."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from support.gateway_procs import start_fake_engines, start_gateway
from support.procs import until

HOT = "You are the support assistant of the hottest tenant. " * 40  # ~2,000 characters: one prefix
SERVED = "x-gateway-destination-endpoint-served"


def _body(system: str, user: str) -> dict:
    return {"model": "fake-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def _metric_sum(url: str, name: str) -> float:
    return _series_sum(httpx.get(url + "/metrics").text, name)


def _series_sum(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf'^{name}\{{[^}}]*\}} (\S+)$', text, re.M))


async def _until_held(client: httpx.AsyncClient, timeout_s: float = 10.0) -> None:
    """Poll the gateway until some request waits at an endpoint (the hot engine is full, its overflow held)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _series_sum((await client.get("/metrics")).text, "inferstack_gateway_endpoint_held") > 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no request held at an endpoint within {timeout_s:g} s of the hot burst")


@pytest.fixture(scope="module")
def engines():
    # one request at a time, 250 ms each: a burst of 30 keeps an engine busy for seconds
    started = start_fake_engines(3, "--ttft-ms", "250", "--tokens", "2", "--itl-ms", "1", "--max-running", "1")
    yield started
    for e in started:
        e.stop()


Answer = tuple[int, float, str]  # status, seconds to the whole answer, the endpoint that served it


async def _hot_burst_then_cold(url: str, hot: int, cold: int) -> tuple[list[Answer], list[Answer]]:
    """``hot`` requests of one tenant at once, then ``cold`` requests of distinct tenants one after another."""
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        async def post(body: dict) -> Answer:
            t0 = time.monotonic()
            r = await client.post("/v1/chat/completions", json=body)
            return r.status_code, time.monotonic() - t0, r.headers.get(SERVED, "")

        hot_tasks = [asyncio.create_task(post(_body(HOT, f"question {i}"))) for i in range(hot)]
        await _until_held(client)  # the hot engine is full, its overflow waits
        cold_out = [await post(_body(f"Tenant {i} has its own assistant. " * 40, "hello")) for i in range(cold)]
        return list(await asyncio.gather(*hot_tasks)), cold_out


def test_a_hot_engine_does_not_hold_back_requests_for_idle_engines(engines):
    gw = start_gateway({"pools": {"p": {"endpoints": [e.url for e in engines], "models": ["fake-model"]}},
                        "gateway": {"flow_control": {"queue_threshold": 2, "queue_timeout_s": 30}}})
    try:
        hot, cold = asyncio.run(_hot_burst_then_cold(gw.url, hot=30, cold=8))
        assert [s for s, _, _ in hot + cold] == [200] * len(hot + cold), (hot, cold)
        # the router may send a cold request where hot ones wait (it balances prefixes too); those sent to an
        # engine the hot tenant does not use are served at once (~0.25 s), where the old signed sum held the
        # first of them at the pool behind the hot overflow for seconds
        hot_engines = {ep for _, _, ep in hot}
        elsewhere = [round(t, 2) for _, t, ep in cold if ep not in hot_engines]
        assert len(elsewhere) >= 3 and max(elsewhere) < 1.5, (elsewhere, hot_engines, cold)
        # the hot overflow waited at its engine(s): counted in the queue depth while it did, and it drains
        assert until(lambda: _metric_sum(gw.url, "inferstack_gateway_queue_depth") == 0)
        assert until(lambda: _metric_sum(gw.url, "inferstack_gateway_endpoint_held") == 0)
    finally:
        gw.stop()
