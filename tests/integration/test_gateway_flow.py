"""Flow control under saturation, through real processes: fairness, priorities, shedding."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from inferstack.gateway.auth import hash_key
from inferstack.telemetry import promtext
from support.gateway_procs import start_fake_engines, start_gateway


@pytest.fixture(scope="module")
def engines():
    # 60 ms per request: the clients' own turnaround (one Python process, maybe starved of CPU) stays small
    # next to a request's queue wait, so both flows keep waiters queued at the gateway (fair sharing only
    # divides a pool between flows that wait; a flow with nobody queued rightly yields its turn)
    engines = start_fake_engines(2, "--ttft-ms", "60", "--tokens", "2", "--itl-ms", "1")
    yield engines
    for e in engines:
        e.stop()


@pytest.fixture(scope="module")
def saturated_gateway(engines):
    cfg = {
        "pools": {"p": {"endpoints": [e.url for e in engines], "max_concurrency": 1, "models": ["fake-model"]}},
        "objectives": {"batch": {"priority": -1}, "interactive": {"priority": 10}},
        "keys": [{"sha256": hash_key("key-a"), "tenant": "a"}, {"sha256": hash_key("key-b"), "tenant": "b",
                                                                   "max_objective": "interactive"}],
        "gateway": {"flow_control": {"queue_timeout_s": 20}},
    }
    gw = start_gateway(cfg)
    yield gw
    gw.stop()


async def _loop(client: httpx.AsyncClient, key: str, stop: asyncio.Event, done: list, lat: list):
    while not stop.is_set():
        t = time.monotonic()
        r = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        done.append((key, time.monotonic()))
        lat.append(time.monotonic() - t)


async def _queued(client: httpx.AsyncClient) -> float:
    """Requests waiting in the pool's flow-control queue now (the gateway's own gauge, every band)."""
    scrape = promtext.parse((await client.get("/metrics")).text, 0.0)
    return sum(scrape.select("inferstack_gateway_queue_depth", pool="p").values())


async def _until(cond, what: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not await cond():
        assert time.monotonic() < deadline, f"not reached in {deadline_s:g}s: {what}"
        await asyncio.sleep(0.02)


async def _shed_once(client: httpx.AsyncClient) -> httpx.Response:
    """A sheddable request sent while requests wait in the queue (polled, not assumed after a sleep)."""
    async def queued() -> bool:
        return await _queued(client) > 0
    await _until(queued, "a queue at the gateway")
    return await client.post("/v1/chat/completions",
                             headers={"authorization": "Bearer key-a", "x-gateway-inference-objective": "batch"},
                             json={"model": "fake-model", "messages": [{"role": "user", "content": "bulk"}]})


def test_fair_share_priorities_and_shedding(saturated_gateway, engines):
    async def main():
        async with httpx.AsyncClient(base_url=saturated_gateway.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as client:
            stop = asyncio.Event()
            done: list[tuple[str, float]] = []
            lat_std: list[float] = []
            tasks = [asyncio.create_task(_loop(client, "key-a", stop, done, lat_std)) for _ in range(12)]
            tasks += [asyncio.create_task(_loop(client, "key-b", stop, done, lat_std)) for _ in range(5)]
            # sheddable traffic is refused while the pool is saturated
            r = await _shed_once(client)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "shed"
            # steady state: from the first completion once a queue stands until enough completions were seen
            # (a count, not a wall-clock span: a loaded machine completes fewer per second)
            first = len(done)

            async def enough() -> bool:
                return len(done) - first >= 100
            # high priority jumps the queue
            lat_hi: list[float] = []
            for _ in range(5):
                t = time.monotonic()
                r = await client.post("/v1/chat/completions",
                                      headers={"authorization": "Bearer key-b",
                                               "x-gateway-inference-objective": "interactive"},
                                      json={"model": "fake-model", "messages": [{"role": "user", "content": "now"}]})
                assert r.status_code == 200
                lat_hi.append(time.monotonic() - t)
            await _until(enough, "100 completions under saturation")
            window = [k for k, _ in done[first:]]  # taken while every client still loops: both flows wait
            stop.set()
            await asyncio.gather(*tasks)
            metrics = (await client.get("/metrics")).text
            return window, lat_std, lat_hi, metrics

    window, lat_std, lat_hi, metrics = asyncio.run(main())
    a, b = window.count("key-a"), window.count("key-b")
    print("fair share", a, b, "hi", statistics.median(lat_hi), "std", statistics.median(lat_std))
    # a runs 3x as many clients, yet both get an equal share of the pool (first come, first
    # served would give a three times b's share)
    assert abs(a - b) <= 0.2 * (a + b) / 2, (a, b)
    assert statistics.median(lat_hi) < 0.5 * statistics.median(lat_std), (lat_hi, statistics.median(lat_std))
    assert 'inferstack_gateway_shed_total{pool="p",reason="shed"} 1.0' in metrics
    assert "inferstack_gateway_queue_wait_seconds_count" in metrics
    # max_concurrency is a hard cap: prefix affinity must not stack requests on one endpoint
    assert [httpx.get(f"{e.url}/debug/requests").json()["peak_running"] for e in engines] == [1, 1]
