"""Overload on slow engines (emulated CPU engines: the real scheduler, batch cap and /metrics, with the
timing of the README stack's CPU replicas): the excess waits at the gateway, where it is refused at
arrival, not in the engines' own FIFO queues where nothing can shed it; and nothing keeps running at
the engines once the client stops (docs/gateway.md, "When flow control queues, and how it releases")."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from support.gateway_procs import start_gateway
from support.procs import start_inferstack

BATCH = 4        # each engine's running-batch cap: 4 requests of 48 tokens take ~5 s, ~0.8 req/s per engine
RATE = 6.0       # requests per second: ~4x what the two engines complete
SECONDS = 15.0
TOKEN = "overload-test-admin-token"


def _engine_counts(url: str) -> tuple[float, float]:
    """(running, waiting) from one engine's /metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text
    got = [float(re.search(rf'^vllm:num_requests_{k}\{{[^}}]*\}} (\S+)$', text, re.M).group(1))
           for k in ("running", "waiting")]
    return got[0], got[1]


@pytest.fixture(scope="module")
def slow_stack():
    engines = start_inferstack(["engine", "serve", "--emulate", "cpu:smollm2-135m", "--emulate-count", "2",
                                "--max-num-seqs", str(BATCH)])
    # a queue timeout shorter than the default keeps waits short; the admission budget (half of it, 6 s)
    # still outlasts the engines' first batch (~5 s), so the pool is not taken for stalled before it
    gw = start_gateway({"pools": {"p": {"endpoints": engines.urls}},
                        "gateway": {"flow_control": {"queue_timeout_s": 12}}}, env={"INFERSTACK_ADMIN_TOKEN": TOKEN})
    yield engines, gw
    gw.stop()
    engines.stop()


async def _overload(gw_url: str, engine_urls: list[str]) -> tuple[list[tuple[int, float]], list[tuple[float, float]]]:
    """Send RATE req/s for SECONDS; returns (status, seconds to answer) of the answered requests and
    (time, waiting summed over the engines) sampled meanwhile. Unanswered requests are cancelled."""
    model = httpx.get(gw_url + "/v1/models").json()["data"][0]["id"]
    answered: list[tuple[int, float]] = []
    waiting: list[tuple[float, float]] = []
    async with httpx.AsyncClient(base_url=gw_url, timeout=60, limits=httpx.Limits(max_connections=256)) as client:
        async def one(i: int) -> None:
            body = {"model": model, "max_tokens": 48, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"request {i}: " + f"word{i} " * 40}]}
            sent = time.monotonic()
            r = await client.post("/v1/chat/completions", json=body)
            answered.append((r.status_code, time.monotonic() - sent))

        async def sample(t0: float) -> None:
            while True:
                counts = await asyncio.gather(*(asyncio.to_thread(_engine_counts, u) for u in engine_urls))
                waiting.append((time.monotonic() - t0, sum(w for _, w in counts)))
                await asyncio.sleep(0.2)

        t0 = time.monotonic()
        sampler = asyncio.create_task(sample(t0))
        tasks = []
        for i in range(int(RATE * SECONDS)):
            await asyncio.sleep(max(0.0, t0 + i / RATE - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        sampler.cancel()
        for t in tasks:  # the client stops: whatever is still waiting or running is abandoned
            t.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)
    return answered, waiting


def test_excess_is_refused_at_the_gateway_not_queued_in_the_engines(slow_stack):
    engines, gw = slow_stack
    answered, waiting = asyncio.run(_overload(gw.url, engines.urls))
    refused = [s for code, s in answered if code == 429]
    served = [s for code, s in answered if code == 200]
    assert refused and served, answered
    assert all(code in (200, 429) for code, _ in answered), answered
    # shed at arrival: every refusal within 1 s of sending (deadline-aware admission at the gateway)
    assert max(refused) < 1.0, sorted(refused)[-5:]
    # once each engine's pace is measured (its first batch finished, ~5 s in) its own queue holds at most
    # one request; before, the count threshold kept five waiting at each engine for the whole overload
    late = [w for t, w in waiting if t > 8.0]
    assert late and max(late) <= 2, waiting
    # the gateway measured each engine's pace while full: a batch of 4 every ~5 s, ~1.2 s per completion
    pools = httpx.get(gw.url + "/admin/pools", headers={"authorization": f"Bearer {TOKEN}"}).json()["pools"]
    assert all(0.5 < e["drain_s"] < 5.0 for e in pools["p"]), pools
    # the client stopped: nothing keeps running or waiting at the engines
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sum(sum(_engine_counts(u)) for u in engines.urls) == 0:
            break
        time.sleep(0.1)
    assert sum(sum(_engine_counts(u)) for u in engines.urls) == 0
