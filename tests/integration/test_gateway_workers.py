"""`gateway.workers: 2` with real processes: both workers serve, one /metrics reports the whole
gateway, an endpoint's max_concurrency and a tenant's RPM hold across workers, and no worker
outlives the gateway (SIGTERM, a worker's crash, SIGKILL of the supervisor)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest

from inferstack.gateway.auth import hash_key
from inferstack.telemetry import promtext
from support.gateway_procs import start_fake_engines, start_gateway

CAP = 3  # per endpoint: worker 0 holds 2 slots, worker 1 holds 1


@pytest.fixture(scope="module")
def engines():
    engines = start_fake_engines(2, "--ttft-ms", "15", "--tokens", "2", "--itl-ms", "1")
    yield engines
    for e in engines:
        e.stop()


def _config(engines, **gateway) -> dict:
    return {
        "gateway": gateway,
        "pools": {"p": {"endpoints": [e.url for e in engines], "max_concurrency": CAP, "models": ["fake-model"]}},
        "keys": [{"sha256": hash_key("key-a"), "tenant": "a"}, {"sha256": hash_key("key-l"), "tenant": "limited"}],
        "tenants": {"a": {"rpm": 1_000_000}, "limited": {"rpm": 10}},
    }


@pytest.fixture(scope="module")
def gateway(engines):
    gw = start_gateway(_config(engines, workers=2))
    yield gw
    gw.stop()


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _alive(pids)


def _served(text: str) -> float:
    """Completed requests (status 200) in a gateway exposition."""
    scrape = promtext.parse(text, 0.0, names=frozenset({"inferstack_gateway_requests_total"}))
    return sum(scrape.select("inferstack_gateway_requests_total", status="200").values())


def _own_metrics(worker: dict) -> str:
    with httpx.Client(transport=httpx.HTTPTransport(uds=worker["metrics_socket"]), timeout=5) as c:
        return c.get("http://worker/metrics").text


async def _burst(url: str, key: str, n: int, connections: int) -> list[int]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        rs = await asyncio.gather(*(client.post(
            "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
            json={"model": "fake-model", "messages": [{"role": "user", "content": f"hi {i}"}]}) for i in range(n)))
    return [r.status_code for r in rs]


def test_both_workers_serve_and_metrics_count_the_whole_gateway(gateway, engines):
    workers = gateway.ready["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    statuses = asyncio.run(_burst(gateway.url, "key-a", 120, 24))
    assert statuses == [200] * 120
    own = [_served(_own_metrics(w)) for w in workers]
    assert all(n > 0 for n in own), own  # the kernel spread the connections over both workers
    assert sum(own) == 120
    for _ in range(4):  # every scrape, whichever worker answers it, reports all 120
        text = httpx.get(gateway.url + "/metrics", timeout=5).text
        assert _served(text) == 120
    tokens = promtext.parse(text, 0.0, names=frozenset({"inferstack_gateway_tokens_total"}))
    assert sum(tokens.select("inferstack_gateway_tokens_total", type="output").values()) == 240  # 2 per answer
    peaks = [httpx.get(e.url + "/debug/requests", timeout=5).json()["peak_load"] for e in engines]
    assert max(peaks) == CAP and min(peaks) >= 1, peaks  # the cap was reached, never passed, across workers


def test_a_tenants_rpm_limit_is_one_limit_across_workers(gateway):
    statuses = asyncio.run(_burst(gateway.url, "key-l", 20, 20))
    assert statuses.count(429) + statuses.count(200) == 20
    assert 10 <= statuses.count(200) <= 11, statuses  # 10 per minute (one more may refill meanwhile)


def test_sigterm_drains_and_leaves_no_worker(gateway):
    pids = [w["pid"] for w in gateway.ready["workers"]]
    assert gateway.stop() == 0
    assert _wait_gone(pids) == []


def test_a_crashed_worker_stops_the_gateway_and_a_killed_supervisor_takes_its_workers(engines):
    gw = start_gateway(_config(engines), "--workers", "2")
    try:
        first, second = (w["pid"] for w in gw.ready["workers"])
        os.kill(first, signal.SIGKILL)
        assert gw.proc.wait(15) == 1
        assert _wait_gone([first, second]) == []
    finally:
        gw.stop()
    gw = start_gateway(_config(engines, workers=2))
    try:
        pids = [w["pid"] for w in gw.ready["workers"]]
        gw.proc.kill()  # no chance to forward anything: the workers' parent-death signal stops them
        gw.proc.wait(5)
        assert _wait_gone(pids) == []
    finally:
        gw.stop()
