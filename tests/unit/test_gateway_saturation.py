"""Flow control's view of capacity: saturation over the queue as of now, room per endpoint, and
shedding at arrival when the measured service rate says the queue timeout would expire first."""

from __future__ import annotations

import asyncio

import pytest

from inferstack.config.schema import FlowControlConfig
from inferstack.gateway.datalayer import parse_engine_metrics
from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.flowqueue import FairQueue
from inferstack.gateway.routing.types import UNBOUNDED, EndpointView, PoolSnapshot
from inferstack.protocol.errors import APIError


def ep(**kw) -> EndpointView:
    return EndpointView("e", **{"has_metrics": True, "metrics_age_s": 0.0, **kw})


def test_requests_the_engine_has_not_reported_count_as_queued():
    snap = PoolSnapshot([], queue_threshold=5.0)
    # the engine reported an empty queue, but the gateway has sent 7 requests since
    assert snap.saturation(ep(in_flight=7)) >= 1.0
    assert snap.room(ep(in_flight=3)) == 2
    # the next scrape shows them running: the queue is empty again
    assert snap.saturation(ep(in_flight=7, running=7.0)) == 0.0
    assert snap.room(ep(in_flight=7, running=7.0)) == 5


def test_unreported_requests_take_the_engines_free_batch_slots_first():
    """c64 on fast engines: responses wait in the gateway's socket backlog, so the engine reports ~0
    running while the gateway holds dozens in flight; with room in its batch nothing is queued."""
    snap = PoolSnapshot([], queue_threshold=5.0)
    fast = ep(in_flight=30, running=1.0, batch_cap=256)
    assert fast.queued_now() == 0.0 and snap.saturation(fast) == 0.0 and snap.room(fast) == 5
    pool = PoolSnapshot([EndpointView(f"e{i}", has_metrics=True, metrics_age_s=0.0, in_flight=16, batch_cap=256)
                         for i in range(4)], queue_threshold=5.0)
    assert pool.free_slots() == 20
    # an engine that exports no batch cap: its running batch is assumed full, the rest waits (as before)
    assert ep(in_flight=30, running=1.0).queued_now() == 29.0
    # a burst beyond the batch: 2 slots free (cap 3, 1 running), so 7 of the 9 unreported wait
    burst = ep(in_flight=10, running=1.0, batch_cap=3)
    assert burst.queued_now() == 7.0 and snap.room(burst) == -2
    # the engine already queues (KV space, not the batch, holds it back): every unreported request waits
    held = ep(in_flight=10, running=1.0, queue=2.0, batch_cap=256)
    assert held.queued_now() == 2.0 + 7.0 and snap.room(held) == -4
    # other gateways' requests in the engine's counts never make this gateway's share negative
    assert ep(in_flight=1, running=40.0, batch_cap=64).queued_now() == 0.0


def test_an_endpoint_without_a_queue_signal_is_limited_by_its_cap_alone():
    snap = PoolSnapshot([], queue_threshold=5.0)
    kv_only = ep(in_flight=40, kv_usage=0.95, reports_queue=False)
    assert snap.saturation(kv_only) == 0.0 and snap.room(kv_only) == 5
    capped = ep(in_flight=8, max_concurrency=8, reports_queue=False)
    assert snap.saturation(capped) == 1.0 and snap.room(capped) == 0


def test_the_scrape_reads_the_batch_cap_and_whether_a_queue_is_reported():
    full = parse_engine_metrics('vllm:num_requests_running{model_name="m"} 3\n'
                                'vllm:num_requests_waiting{model_name="m"} 1\n'
                                'inferstack:max_num_seqs{model_name="m"} 16\n')
    assert (full.running, full.queue, full.batch_cap, full.reports_queue) == (3.0, 1.0, 16, True)
    vllm = parse_engine_metrics('vllm:num_requests_running{model_name="m"} 3\n')
    assert (vllm.batch_cap, vllm.reports_queue) == (0, True)
    sglang = parse_engine_metrics('sglang:num_running_reqs{model_name="m"} 2\n'
                                  'sglang:max_running_requests{model_name="m"} 48\n')
    assert (sglang.running, sglang.batch_cap) == (2.0, 48)
    kv_only = parse_engine_metrics('vllm:kv_cache_usage_perc{model_name="m"} 0.5\n')
    assert (kv_only.kv_usage, kv_only.reports_queue) == (0.5, False)


def test_stale_metrics_do_not_saturate_an_idle_endpoint():
    """A slow scrape must never hold a healthy pool at zero in flight (the collapse)."""
    snap = PoolSnapshot([], stale_after_s=0.2, queue_threshold=5.0)
    stale = ep(metrics_age_s=1.0)
    assert snap.saturation(stale) == 0.0 and snap.room(stale) == 5
    # a scrape failing for long: judged like an endpoint without metrics (cap only)
    assert snap.room(ep(metrics_age_s=60.0, in_flight=40)) == UNBOUNDED
    assert snap.room(ep(metrics_age_s=60.0, in_flight=3, max_concurrency=4)) == 1


def test_uncapped_endpoint_without_metrics_is_never_limited_to_one():
    snap = PoolSnapshot([EndpointView("a", in_flight=40), EndpointView("b", max_concurrency=4, in_flight=1)])
    assert snap.free_slots() == UNBOUNDED
    assert snap.free_slots(lambda e: e.id == "b") == 3


def test_cap_and_queue_both_bound_the_room():
    snap = PoolSnapshot([], queue_threshold=5.0)
    assert snap.room(ep(max_concurrency=2, in_flight=1)) == 1
    assert snap.room(ep(max_concurrency=20, in_flight=12, running=10.0)) == 3
    # KV use saturates only while requests wait: a full prefix cache on an idle engine does not
    assert snap.room(ep(kv_usage=0.9)) == 5
    assert snap.room(ep(kv_usage=0.9, queue=1.0)) == 0
    assert snap.room(ep(kv_usage=0.9, in_flight=3, running=2.0)) == 0
    assert snap.room(EndpointView("down", healthy=False)) == 0
    # over the threshold the room is negative: it counts against the pool's
    assert snap.room(ep(queue=8.0)) == -3


def test_a_hot_endpoints_overflow_counts_against_the_pool():
    hot, cold = ep(queue=9.0), EndpointView("c", has_metrics=True, metrics_age_s=0.0)
    assert PoolSnapshot([hot, cold], queue_threshold=5.0).free_slots() == 1
    assert PoolSnapshot([ep(queue=12.0), cold], queue_threshold=5.0).free_slots() == 0


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_request_that_would_only_time_out_is_refused_at_once():
    async def main():
        clock = Clock()
        free = [0]
        fc = FlowController(FlowControlConfig(queue_timeout_s=5.0), lambda: free[0], now=clock)
        waiters = [asyncio.create_task(fc.admit(0, "t")) for _ in range(4)]
        await asyncio.sleep(0)
        assert fc.queued == 4  # no rate measured yet: the queue's first second is let in
        clock.t += 2.0
        free[0] = 2
        fc.queue.completed()
        fc.queue.completed()
        assert fc.pump() == 2  # two completed after 2 s busy: 1 s per release
        free[0] = 0  # ... and routed: they now count in their endpoints' in-flight
        fc.routed()
        fc.routed()
        assert fc.queued == 2  # the pool did not stall: nobody let in is refused later
        # 2 ahead at 1 s each: 3 s > half the 5 s timeout -> refused now, not after 5 s
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(APIError) as exc:
            await fc.admit(0, "late")
        assert exc.value.status == 429 and exc.value.code == "queue_timeout"
        assert int(exc.value.headers["retry-after"]) == 3
        assert asyncio.get_running_loop().time() - t0 < 0.1
        # a higher priority with nobody ahead (1 s) still queues
        high = asyncio.create_task(fc.admit(5, "vip"))
        await asyncio.sleep(0)
        assert fc.queued == 3
        for t in [*waiters, high]:
            t.cancel()
        await asyncio.gather(*waiters, high, return_exceptions=True)

    asyncio.run(main())


def test_fair_queue_is_the_pure_policy_the_simulator_runs():
    clock = Clock()
    room = [0]
    q = FairQueue(FlowControlConfig(queue_timeout_s=10.0), lambda: room[0], now=clock)
    for i in range(4):
        assert q.admit(f"a{i}", 0, "a") is False
    assert q.admit("b0", 0, "b") is False and q.admit("vip", 5, "c") is False
    room[0] = 3
    assert q.release() == [("vip", 5), ("a0", 0), ("b0", 0)]  # band first, then fair share
    assert q.pending == 3 and q.release() == []                # reservations hold the room
    q.routed()
    assert q.remove("a2", 0) and not q.remove("a2", 0)
    clock.t += 11.0
    assert q.expire() == [("a1", 0), ("a3", 0)] and q.queued == 0


def test_in_flight_gauge_reads_the_endpoints_counters_at_scrape_time():
    from prometheus_client import generate_latest

    from inferstack.gateway.metrics import GatewayMetrics

    live = {"a": 3, "b": 0}
    m = GatewayMetrics()
    m.track_in_flight(lambda: [("p", e, n) for e, n in live.items()])
    text = generate_latest(m.registry).decode()
    assert 'inferstack_gateway_in_flight{endpoint="a",pool="p"} 3.0' in text
    live["a"] = 1
    assert 'inferstack_gateway_in_flight{endpoint="a",pool="p"} 1.0' in generate_latest(m.registry).decode()
