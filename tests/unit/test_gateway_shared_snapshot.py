"""One pool snapshot per request for admission and routing (`Admission.snapshot`, `Picker.pick`): flow control's
free-slot check takes it, and the first pick reuses it when the request passed straight through; a request that
waited, a retry, a pick with ``exclude`` or a plan that asked /tokenize routes over a new one. A shared snapshot
routes exactly as two do."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.config.schema import InferstackConfig
from inferstack.gateway.datalayer import Pool, ScrapedMetrics
from inferstack.gateway.pipeline.context import Inbound, RequestContext
from inferstack.gateway.pipeline.core import Pipeline
from inferstack.gateway.routing import PRESETS

ENDPOINTS = [f"http://127.0.0.1:{9100 + i}" for i in range(3)]


def _pipeline(routing: str = "default", seed: int = 0, **pool: object) -> Pipeline:
    cfg = InferstackConfig.model_validate(
        {"pools": {"p": {"endpoints": ENDPOINTS, "models": ["m"], "routing": routing, **pool}}})
    return Pipeline(cfg, rng=random.Random(seed))


def _body(prompt: str) -> bytes:
    return orjson.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]})


async def _start(pipe: Pipeline, prompt: str) -> RequestContext:
    return await pipe.start(Inbound.arrive("chat", {}, pipe.request_ids), _body(prompt))


def _count_snapshots(pool: Pool, monkeypatch) -> list[int]:
    calls = [0]
    build = Pool.snapshot

    def counted(self, exclude=frozenset()):
        calls[0] += 1
        return build(self, exclude)

    monkeypatch.setattr(Pool, "snapshot", counted)
    return calls


def test_a_request_that_passes_straight_through_builds_one_snapshot(monkeypatch):
    async def run() -> None:
        pipe = _pipeline()
        pool = pipe.pools["p"]
        calls = _count_snapshots(pool, monkeypatch)
        ctx = await _start(pipe, "hello")
        assert calls[0] == 1 and ctx.admission.snapshot is not None  # flow control's free-slot check
        first = pipe.picker.pick(ctx)
        assert first is not None and calls[0] == 1  # routed over admission's snapshot
        assert ctx.admission.snapshot is None
        assert pipe.picker.pick(ctx, [first.endpoint.id]) is not None and calls[0] == 2  # a retry: its own
        assert pipe.picker.pick(ctx) is not None and calls[0] == 3  # admission's is used once only

    asyncio.run(run())


def test_a_request_that_waited_in_the_queue_routes_over_a_new_snapshot():
    async def run() -> None:
        pipe = _pipeline(max_concurrency=1)
        pool = pipe.pools["p"]
        for ep in pool.endpoints:
            ep.in_flight = 1  # the pool is full: the next request queues
        waiting = asyncio.create_task(_start(pipe, "hello"))
        while not pipe.flow["p"].queued:
            await asyncio.sleep(0)
        pool.endpoints[2].in_flight = 0
        pipe.flow["p"].pump()
        ctx = await waiting
        assert ctx.admission.reserved and ctx.admission.snapshot is None
        picked = pipe.picker.pick(ctx)
        assert picked is not None and picked.endpoint is pool.endpoints[2]  # the room freed while it waited

    asyncio.run(run())


def test_no_snapshot_is_kept_without_flow_control_or_after_a_tokenize():
    async def run() -> None:
        off = _pipeline()
        off.cfg.gateway.flow_control.enabled = False
        assert (await _start(off, "hello")).admission.snapshot is None
        # precise prefix: plan asks an engine's /tokenize (here nobody answers), so the task suspended
        precise = _pipeline(precise_prefix={"model_digest": "0" * 64})
        assert (await _start(precise, "hello")).admission.snapshot is None

    asyncio.run(run())


# per endpoint: engine queue, running, KV use, the gateway's in-flight, healthy, scraped (else no metrics)
_STATE = st.tuples(st.integers(0, 6), st.integers(0, 8), st.floats(0.0, 1.0), st.integers(0, 6),
                   st.sampled_from([True, True, True, False]), st.booleans())


def _set(pool: Pool, state: list[tuple[int, int, float, int, bool, bool]], at: float) -> None:
    for ep, (queue, running, kv, in_flight, healthy, scraped) in zip(pool.endpoints, state, strict=True):
        ep.metrics = ScrapedMetrics(queue=queue, running=running, kv_usage=kv, batch_cap=4) if scraped else None
        ep.metrics_at = at
        ep.in_flight = in_flight
        ep.active_ok = healthy


@settings(max_examples=40, deadline=None)
@given(preset=st.sampled_from(sorted(PRESETS)), seed=st.integers(0, 3),
       steps=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.lists(_STATE, min_size=3, max_size=3)),
                      min_size=1, max_size=8))
def test_a_shared_snapshot_routes_as_a_new_one(preset, seed, steps):
    """Two identical gateways (same seed) over the same pool states: one routes over admission's snapshot,
    the other over a new one; every admission and every decision is the same."""
    async def run() -> None:
        shared, fresh = _pipeline(preset, seed), _pipeline(preset, seed)
        for prompt, state in steps:
            at = time.monotonic()  # scrape ages of ~0: the two snapshots' clocks differ by microseconds
            outcomes = []
            for pipe in (shared, fresh):
                _set(pipe.pools["p"], state, at)
                task = asyncio.ensure_future(_start(pipe, prompt * 50))
                await asyncio.sleep(0)  # one step: a request that passes straight through is admitted and planned
                if not task.done():  # no room: it waits in the queue (then leaves it), the same for both
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    outcomes.append("queued")
                    continue
                ctx = task.result()
                if pipe is fresh:
                    ctx.admission.snapshot = None
                picked = pipe.picker.pick(ctx)
                outcomes.append(picked and (picked.endpoint.id, picked.result.profile, picked.result.reason))
            assert outcomes[0] == outcomes[1]

    asyncio.run(run())
