"""Flow control's admission decision (`flowqueue.admission_wait`, a pure function), the service rate it
reads (`ServiceRate`), and the policy on a pool whose completions come in bursts, as CPU engines'
running batches finish together: every refusal at arrival, nothing let in waits past the timeout,
and the pool stays busy."""

from __future__ import annotations

import math

import pytest

from inferstack.config.schema import FlowControlConfig
from inferstack.gateway.enginedrain import pool_drain_s
from inferstack.gateway.flowqueue import FairQueue, Rejected, ServiceRate, admission_wait


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("ahead", "per_release", "budget", "refused_with"), [
    (50, None, 15.0, None),   # no rate measured yet: queue
    (0, 2.0, 15.0, None),     # 2 s
    (6, 2.0, 15.0, None),     # 14 s
    (7, 2.0, 15.0, 16.0),     # 16 s > 15 s: refuse now, Retry-After 16
    (4, 3.0, 15.0, None),     # exactly the budget: queue
    (0, 20.0, 15.0, 20.0),    # one release takes longer than the budget: nobody queues
])
def test_admission_refuses_at_arrival_when_the_predicted_wait_exceeds_the_budget(ahead, per_release, budget,
                                                                                  refused_with):
    assert admission_wait(ahead, per_release, budget) == refused_with


def test_service_rate_averages_bursts_over_busy_time_and_sees_a_stall():
    clock = Clock()
    rate = ServiceRate(now=clock, min_samples=16, window_s=60.0)
    rate.completed()  # the queue is empty: not a sample of the saturated pool
    rate.queue_changed(3)
    clock.t = 0.5
    assert rate.seconds_per_release() is None  # nothing seen, busy for under a second
    clock.t = 4.0
    assert rate.seconds_per_release() == pytest.approx(4.0)  # no release yet: at least the busy time so far
    for cycle in range(1, 4):  # a batch of 8 finishes every 20 s of busy time
        clock.t = 20.0 * cycle
        for _ in range(8):
            rate.completed()
    assert rate.seconds_per_release() == pytest.approx(60.0 / 24)  # all of the last 60 s of busy time
    rate.queue_changed(0)
    clock.t = 500.0  # idle: not busy time, and the history survives it
    rate.queue_changed(2)
    assert rate.seconds_per_release() == pytest.approx(60.0 / 24)
    clock.t = 510.0  # busy without a release: the open interval counts
    assert rate.seconds_per_release() == pytest.approx(70.0 / 24)
    assert rate.stalled_s() == pytest.approx(10.0)


def _bursty_run(cfg: FlowControlConfig, arrivals_per_s: float, seconds: float) -> dict:
    """A pool that holds 16 requests and finishes 8 of them together every 20 s (0.4 req/s, two CPU
    engines' batches), fed at ``arrivals_per_s``; flow control runs exactly as the gateway drives it."""
    clock, step = Clock(), 0.1
    room = [16]
    q: FairQueue[tuple[int, float]] = FairQueue(cfg, lambda: room[0], clock)
    out: dict = {"served": 0, "refused_at_arrival": 0, "refused_late": [], "waits": []}
    arrivals, n = 0.0, 0
    for tick in range(int(seconds / step)):
        clock.t = tick * step
        if tick and tick % int(20 / step) == 0:
            room[0] += 8  # a batch finished
            for _ in range(8):
                q.completed()
        arrivals += arrivals_per_s * step
        while arrivals >= 1.0:
            arrivals -= 1.0
            n += 1
            try:
                if q.admit((n, clock.t), 0, f"tenant{n % 4}"):
                    room[0] -= 1
                    out["served"] += 1
                    out["waits"].append(0.0)
            except Rejected:
                out["refused_at_arrival"] += 1
        for (_, at), _ in q.release():
            q.routed()
            room[0] -= 1
            out["served"] += 1
            out["waits"].append(clock.t - at)
        out["refused_late"] += [clock.t - at for (_, at), _, _ in q.hopeless()]
        out["refused_late"] += [clock.t - at for (_, at), _ in q.expire()]
    return out


@pytest.mark.parametrize("factor", [2, 8])
def test_a_bursty_pool_under_overload_refuses_at_arrival_and_stays_busy(factor):
    cfg = FlowControlConfig(queue_timeout_s=30.0)
    run = _bursty_run(cfg, 0.4 * factor, 400.0)
    assert run["refused_late"] == []  # every refusal within the arrival's own call
    assert run["refused_at_arrival"] > 0 and max(run["waits"]) <= cfg.queue_timeout_s
    # 16 at the start, then 8 per 20 s: the pool never idles for want of a queued request
    assert run["served"] >= 16 + 8 * (400 // 20 - 1)


def test_without_evidence_of_a_pace_a_waiter_is_held_half_a_queue_wait_while_engines_are_full():
    clock, free, full = Clock(), [0], [False]
    q: FairQueue[str] = FairQueue(FlowControlConfig(queue_timeout_s=30, queue_wait_s=1.0), lambda: free[0], clock,
                                  engines_full=lambda: full[0])
    assert not q.admit("a", 0, "t") and not q.admit("b", 0, "t")
    clock.t = 0.3
    assert not q.admit("c", 0, "t")
    assert q.hopeless() == []  # 0.3 s: within the hold
    clock.t = 0.51
    assert q.hopeless() == []  # an engine has room: what waits goes there soon
    full[0] = True
    assert [(item, wait) for item, _, wait in q.hopeless()] == [("a", math.inf), ("b", math.inf)]
    free[0] = 1
    q.completed()  # the pool serves: from now on its rate (or its lower bound) predicts, no more holds
    clock.t = 5.0
    assert q.hopeless() == [] and [item for item, _ in q.release()] == ["c"]


def test_the_engines_own_pace_predicts_the_wait_until_the_queue_measures_its_own():
    clock, pace = Clock(), [None]
    q: FairQueue[int] = FairQueue(FlowControlConfig(queue_timeout_s=30), lambda: 0, clock, prior=lambda: pace[0],
                                  engines_full=lambda: True)
    assert not q.admit(0, 0, "t")  # no pace from anywhere: it queues (and is held briefly, above)
    pace[0] = 2.0  # the engines finished a request every 2 s while full (a warm-up): 15 s budget, 7 fit
    for n in range(1, 7):
        assert not q.admit(n, 0, "t")
    with pytest.raises(Rejected) as r:
        q.admit(7, 0, "t")  # 8 x 2 s = 16 s > 15 s: refused at arrival
    assert r.value.code == "queue_timeout" and r.value.retry_after_s == 16
    assert q.evidence() and q.hopeless() == []  # with a pace there is no hold


@pytest.mark.parametrize(("drains", "expected"), [
    ([None, None], None),
    ([4.0, 4.0], 2.0),        # two engines, one completion each per 4 s: the pool releases one per 2 s
    ([4.0, None], 2.0),       # the unmeasured one is assumed as fast as the measured one
    ([2.0, 6.0], 1.5),        # 0.5 + 0.167 per s
    ([0.0, 3.0, None], 1.0),  # a zero is no measurement
])
def test_the_pools_pace_from_its_engines(drains, expected):
    assert pool_drain_s(drains) == (None if expected is None else pytest.approx(expected))
