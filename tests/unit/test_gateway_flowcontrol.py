"""Flow control (priorities, fairness, shedding, timeouts, bounds) and in-memory limits."""

from __future__ import annotations

import asyncio

import pytest

from inferstack.config.schema import FlowControlConfig
from inferstack.gateway.flowcontrol import ClientGone, FlowController
from inferstack.gateway.limits import Limits, MemoryLimiter
from inferstack.protocol.errors import APIError


class Capacity:
    def __init__(self, slots: int):
        self.slots = slots
        self.used = 0

    def free(self) -> int:
        return self.slots - self.used


async def _client(fc: FlowController, cap: Capacity, prio: int, flow: str, order: list, hold: float = 0.0):
    waited = await fc.admit(prio, flow)
    cap.used += 1
    if waited is not None:
        fc.routed()
    order.append((prio, flow))
    await asyncio.sleep(hold)
    cap.used -= 1
    fc.pump()


def test_priorities_are_strict_and_flows_share_fairly():
    async def main():
        cap = Capacity(1)
        fc = FlowController(FlowControlConfig(), cap.free)
        order: list = []
        cap.used = 1  # saturated
        tasks = [asyncio.create_task(_client(fc, cap, 0, "a", order)) for _ in range(6)]
        tasks += [asyncio.create_task(_client(fc, cap, 0, "b", order)) for _ in range(2)]
        tasks += [asyncio.create_task(_client(fc, cap, 5, "c", order)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert fc.queued == 10
        cap.used = 0
        fc.pump()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(main())
    assert order[:2] == [(5, "c"), (5, "c")]
    # a and b alternate while both wait, then a's backlog drains
    assert [f for _, f in order[2:6]] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_sheddable_gets_429_only_when_saturated():
    async def main():
        cap = Capacity(1)
        fc = FlowController(FlowControlConfig(), cap.free)
        assert await fc.admit(-1, "x") is None
        cap.used = 1
        with pytest.raises(APIError) as exc:
            await fc.admit(-1, "x")
        assert exc.value.status == 429 and exc.value.headers["retry-after"]

    asyncio.run(main())


def test_queue_timeout_and_bound():
    async def main():
        cap = Capacity(0)
        fc = FlowController(FlowControlConfig(queue_timeout_s=0.05, max_queued=1), cap.free)
        t = asyncio.create_task(fc.admit(0, "a"))
        await asyncio.sleep(0.01)
        with pytest.raises(APIError, match="queued"):
            await fc.admit(0, "b")
        with pytest.raises(APIError, match="Timed out"):
            await t
        assert fc.queued == 0 and not fc.queue._bands  # memory released

    asyncio.run(main())


def test_cancelled_waiter_leaves_queue():
    async def main():
        cap = Capacity(0)
        fc = FlowController(FlowControlConfig(), cap.free)
        t = asyncio.create_task(fc.admit(0, "a"))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert fc.queued == 0

    asyncio.run(main())


def test_memory_limiter_rpm_and_tpm():
    async def main():
        lim = MemoryLimiter()
        limits = Limits(rpm=3, tpm=None)
        assert [(await lim.acquire("t", limits, 1))[0] for _ in range(3)] == [0, 0, 0]
        wait, which = await lim.acquire("t", limits, 1)
        assert which == "rpm" and 0 < wait <= 20
        assert (await lim.acquire("other", limits, 1))[0] == 0  # per tenant
        tl = Limits(rpm=None, tpm=1000)
        assert (await lim.acquire("u", tl, 100))[0] == 0
        await lim.settle("u", tl, 1500)  # real usage was much larger: the bucket is in debt
        wait, which = await lim.acquire("u", tl, 100)
        assert which == "tpm" and wait > 30

    asyncio.run(main())


def test_a_departed_client_leaves_the_queue_at_once():
    """A queued request whose client hangs up is removed then (ClientGone), so it never takes the slot
    that frees up next: the request behind it gets it."""
    async def main():
        cap = Capacity(1)
        cap.used = 1  # saturated
        fc = FlowController(FlowControlConfig(), cap.free)
        gone = asyncio.get_running_loop().create_future()
        first = asyncio.create_task(fc.admit(0, "a", client_gone=gone))
        second = asyncio.create_task(fc.admit(0, "b"))
        await asyncio.sleep(0.01)
        assert fc.queued == 2
        gone.set_result(None)
        with pytest.raises(ClientGone):
            await first
        assert fc.queued == 1
        cap.used = 0
        fc.pump()
        assert await second is not None      # the live client got the freed slot
        fc.routed()
        assert (fc.queued, fc.pending) == (0, 0)

    asyncio.run(main())
