"""Admission without coroutines where nothing waits (`Limiter.acquire_now` / `settle_now`, `FlowController.passes`):
in-process buckets are taken and settled by plain calls and a request that flow control lets through never enters
its waiting coroutine; a limiter whose buckets are in a store (Redis) is still awaited, with the same answers."""

from __future__ import annotations

import asyncio
import hashlib
import random
from types import SimpleNamespace

import orjson
import pytest

from inferstack.config.schema import InferstackConfig
from inferstack.gateway import limits
from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.limits import Limits, MemoryLimiter
from inferstack.gateway.pipeline.context import Inbound, RequestContext
from inferstack.gateway.pipeline.core import Pipeline
from inferstack.protocol.errors import APIError

KEY = "sk-admit-now"
TPM = 6000


class NoAwaitLimiter(MemoryLimiter):
    """In-process buckets whose coroutine methods must not be used on the request path."""

    async def acquire(self, tenant: str, limits: Limits, tokens: int) -> tuple[float, str]:
        raise AssertionError("acquire awaited although acquire_now answers")

    async def settle(self, tenant: str, limits: Limits, delta_tokens: int) -> None:
        raise AssertionError("settle awaited although settle_now settles")


class StoreLimiter(MemoryLimiter):
    """Buckets behind a store (like `RedisLimiter`): no answer without awaiting; counts the awaits."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited: list[str] = []

    def acquire_now(self, tenant: str, limits: Limits, tokens: int) -> None:
        return None

    async def acquire(self, tenant: str, limits: Limits, tokens: int) -> tuple[float, str]:
        self.awaited.append("acquire")
        await asyncio.sleep(0)  # a round trip suspends
        return MemoryLimiter.acquire_now(self, tenant, limits, tokens)

    def settle_now(self, tenant: str, limits: Limits, delta_tokens: int) -> bool:
        return False

    async def settle(self, tenant: str, limits: Limits, delta_tokens: int) -> None:
        self.awaited.append("settle")
        await asyncio.sleep(0)
        MemoryLimiter.settle_now(self, tenant, limits, delta_tokens)


def _pipeline(limiter: MemoryLimiter, rpm: int = 1000) -> Pipeline:
    cfg = InferstackConfig.model_validate({
        "pools": {"p": {"endpoints": ["http://127.0.0.1:9101", "http://127.0.0.1:9102"], "models": ["m"]}},
        "keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "t"}],
        "tenants": {"t": {"rpm": rpm, "tpm": TPM}}})
    return Pipeline(cfg, limiter=limiter, rng=random.Random(0))


async def _start(pipe: Pipeline) -> RequestContext:
    body = orjson.dumps({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]})
    inbound = Inbound.arrive("chat", {b"authorization": f"Bearer {KEY}".encode()}, pipe.request_ids)
    return await pipe.start(inbound, body)


def _tpm_level(lim: MemoryLimiter) -> float:
    return lim._b[("t", "tpm")][0]


@pytest.mark.parametrize("limiter_type", [NoAwaitLimiter, StoreLimiter])
def test_tpm_is_reserved_and_settled_with_or_without_a_store(limiter_type, monkeypatch):
    # the buckets' clock stands still: a refill of 100 tokens a second would otherwise make the levels depend on how
    # long a loaded machine takes between the calls (0.3 s once filled the bucket back to 6000)
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: 1000.0))

    async def run() -> None:
        lim = limiter_type()
        pipe = _pipeline(lim)
        ctx = await _start(pipe)
        res = ctx.admission.tokens
        assert res is not None and res.tenant == "t" and res.tokens > 100  # the prompt's estimate + max_tokens
        assert _tpm_level(lim) == TPM - res.tokens
        ctx.outcome.usage_tokens = 30
        await pipe.close(ctx)
        assert res.settled and _tpm_level(lim) == TPM - 30  # the rest came back
        if isinstance(lim, StoreLimiter):
            assert lim.awaited == ["acquire", "settle"]

    asyncio.run(run())


def test_a_refusal_by_in_process_buckets_is_the_same_429():
    async def run() -> None:
        pipe = _pipeline(NoAwaitLimiter(), rpm=1)
        await _start(pipe)
        with pytest.raises(APIError) as refused:
            await _start(pipe)
        assert refused.value.status == 429 and refused.value.code == "rpm_limit_exceeded"
        assert int(refused.value.headers["retry-after"]) >= 1

    asyncio.run(run())


def test_a_request_that_passes_flow_control_never_enters_its_waiting_coroutine(monkeypatch):
    async def must_not_wait(self, *args, **kwargs):
        raise AssertionError("flow control's coroutine entered by a request that passes")

    monkeypatch.setattr(FlowController, "admit", must_not_wait)
    monkeypatch.setattr(FlowController, "wait", must_not_wait)

    async def run() -> None:
        ctx = await _start(_pipeline(NoAwaitLimiter()))
        assert not ctx.admission.reserved and ctx.admission.snapshot is not None

    asyncio.run(run())
