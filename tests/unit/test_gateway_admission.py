"""Flow control's admission decision (`flowqueue.admission_wait`, a pure function), the service rate it
reads (`ServiceRate`), and the policy on a pool whose completions come in bursts, as CPU engines'
running batches finish together: every refusal at arrival, nothing let in waits past the timeout,
and the pool stays busy."""

from __future__ import annotations

import pytest

from inferstack.config.schema import FlowControlConfig
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
