"""Flow control (priorities, fairness, shedding, timeouts, bounds) and in-memory limits."""

from __future__ import annotations

import asyncio

import pytest

from inferstack.config.schema import FlowControlConfig
from inferstack.gateway.flowcontrol import ClientGone, FlowController
from inferstack.gateway.flowqueue import FairQueue
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


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_stalled_pool_refuses_its_waiters_before_the_timeout_a_burst_cycle_does_not():
    clock, free = Clock(), [0]
    q: FairQueue[str] = FairQueue(FlowControlConfig(queue_timeout_s=10, max_queued=100), lambda: free[0], clock)
    for name in "abcdef":
        assert not q.admit(name, 0, "t1")
    assert not q.admit("h", 1, "t2")  # higher priority: released first, so it is first in line
    clock.t, free[0] = 0.5, 3
    for _ in range(3):
        q.completed()
    assert [item for item, _ in q.release()] == ["h", "a", "b"]
    for _ in range(3):
        q.routed()
    free[0], clock.t = 0, 5.0
    assert q.hopeless() == []  # 4.5 s without a release: within the 5 s budget, a burst cycle may be that long
    clock.t = 6.0  # 5.5 s: a stall. 3 completions in 6 s of busy time: 2 s each; c..f have waited 6 s of 10.
    refused = q.hopeless()
    assert [(item, prio) for item, prio, _ in refused] == [("e", 0), ("f", 0)]
    assert [round(wait, 2) for _, _, wait in refused] == [6.0, 6.0]  # third in line, behind c and d who stay
    assert q.queued == 2 and q.hopeless() == []  # one check per second
    clock.t = 7.0  # nothing released since: 2.33 s each; c (9.3 s in all) still makes it, d (11.7 s) does not
    assert [item for item, _, _ in q.hopeless()] == ["d"]
    free[0] = 1
    assert [item for item, _ in q.release()] == ["c"]


def test_the_early_refusal_follows_fair_release_order():
    clock, free = Clock(), [0]
    q: FairQueue[str] = FairQueue(FlowControlConfig(queue_timeout_s=20, max_queued=100), lambda: free[0], clock)
    for i in range(4):
        q.admit(f"w{i}", 0, "warm")
    clock.t, free[0] = 0.5, 4
    for _ in range(4):
        q.completed()
    assert len(q.release()) == 4  # 4 completions in 0.5 s busy; the queue empties
    for _ in range(4):
        q.routed()
    free[0], clock.t = 0, 1.0
    for name in ("x1", "x2", "x3", "x4"):
        q.admit(name, 0, "busy-tenant")
    q.admit("y1", 0, "quiet-tenant")
    clock.t = 12.0  # 11 s without a release (> the 10 s budget): (0.5 + 11) / 4 = 2.875 s each, all waited 11 s
    assert [item for item, _, _ in q.hopeless()] == ["x3", "x4"]  # y1 goes before x2: it is y's turn


def test_a_hopeless_waiter_gets_429_with_retry_after_before_the_timeout():
    async def main():
        cap = Capacity(1)
        fc = FlowController(FlowControlConfig(queue_timeout_s=3), cap.free, engines_full=lambda: cap.used >= 1)
        assert await fc.admit(0, "a") is None
        cap.used = 1
        waiters = [asyncio.create_task(fc.admit(0, "a")) for _ in range(3)]
        await asyncio.sleep(0)  # rate still unknown: all three queue
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = loop.time() + 3.0
        while not all(w.done() for w in waiters) and loop.time() < deadline:
            fc.pump()
            await asyncio.sleep(0.05)
        codes = []
        for w in waiters:
            with pytest.raises(APIError) as err:
                await w
            codes.append((err.value.status, err.value.code, "drain rate" in str(err.value)))
            assert int(err.value.headers["retry-after"]) >= 1
        # No completion ever and the engine full: no pace to promise a wait by, so each is held half of
        # queue_wait_s (1 s), not until the re-check of a stall or the 3 s timeout
        assert codes == [(429, "queue_timeout", False)] * 3
        assert loop.time() - started < 1.0
        assert fc.queued == 0 and not fc.queue._bands

    asyncio.run(main())
