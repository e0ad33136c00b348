"""The engine's own queue is bounded in time: `EngineDrain` measures an engine's seconds per completion
while it is full from the scrapes of its /metrics, and `PoolSnapshot.queue_limit` lets it hold only what
it starts within `queue_wait_s`. The scrapes below follow the README stack under overload (two 1-thread
CPU engines, running batch 8, one completion every ~7.5 s each while full) and a GPU-like engine."""

from __future__ import annotations

import pytest

from inferstack.config.schema import GatewayConfig, PoolConfig
from inferstack.gateway.datalayer import Pool, parse_engine_metrics
from inferstack.gateway.enginedrain import EngineDrain, engine_full
from inferstack.gateway.routing.types import EndpointView, PoolSnapshot


def scrape(running: int, waiting: int, finished: int, cap: int = 8) -> str:
    return (f'vllm:num_requests_running{{model_name="m"}} {running}\n'
            f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
            f'inferstack:max_num_seqs{{model_name="m"}} {cap}\n'
            f'vllm:request_success_total{{model_name="m",finished_reason="stop"}} {finished}\n'
            f'vllm:request_success_total{{model_name="m",finished_reason="length"}} 0\n')


def feed(drain: EngineDrain, rows: list[tuple[float, str]]) -> None:
    for t, text in rows:
        m = parse_engine_metrics(text)
        drain.observe(t, m.finished, engine_full(m.queue, m.running, m.batch_cap))


def view(drain: EngineDrain, in_flight: int, running: int, waiting: int = 0, cap: int = 8) -> EndpointView:
    return EndpointView("e", float(waiting), float(running), metrics_age_s=0.0, has_metrics=True,
                        in_flight=in_flight, batch_cap=cap, drain_s=drain.seconds_per_completion())


def slow_engine() -> EngineDrain:
    """Full for 30 s (scraped every 0.5 s), finishing one request every 7.5 s, like a CPU engine."""
    drain = EngineDrain()
    feed(drain, [(t / 2, scrape(8, 0, 100 + int(t / 2 // 7.5))) for t in range(61)])
    return drain


def test_the_scrape_reads_the_finished_counter_over_all_reasons():
    m = parse_engine_metrics(scrape(8, 1, 41))
    assert (m.finished, m.running, m.queue, m.batch_cap) == (41.0, 8.0, 1.0, 8)
    assert parse_engine_metrics('vllm:num_requests_running{model_name="m"} 3\n').finished is None


def test_a_slow_engine_may_hold_at_most_one_waiting_request():
    drain = slow_engine()
    assert drain.seconds_per_completion() == pytest.approx(7.5, rel=0.1)
    snap = PoolSnapshot([], queue_threshold=5.0, queue_wait_s=1.0)
    full = view(drain, in_flight=8, running=8)
    assert snap.queue_limit(full) == pytest.approx(1 / 7.5, rel=0.1)
    assert snap.room(full) == 1                       # one more may wait for the next completion
    one_waiting = view(drain, in_flight=9, running=8, waiting=1)
    assert snap.room(one_waiting) == 0 and snap.saturation(one_waiting) >= 1.0
    # before: the count threshold let five more wait, ~40 s of queue nobody could shed or reorder
    assert PoolSnapshot([], queue_threshold=5.0).room(view(EngineDrain(), in_flight=8, running=8)) == 5
    # slots its responses just freed refill at once: the gateway saw them end (in flight below running)
    assert snap.room(view(drain, in_flight=5, running=8)) == 1
    # but a report of free batch slots is not trusted on a slow engine: one prefilling a cold prompt reports
    # one running for a whole step of seconds while its token budget holds the rest in its FIFO
    prefilling = view(drain, in_flight=8, running=1)
    assert snap.queued(prefilling) == 7.0 and snap.room(prefilling) == -6
    assert prefilling.queued_now() == 0.0  # a fast engine's view of the same report: 7 free slots


def test_two_slow_engines_leave_the_excess_at_the_gateway():
    a, b = slow_engine(), slow_engine()
    pool = PoolSnapshot([view(a, 8, 8), view(b, 8, 8)], queue_threshold=5.0, queue_wait_s=1.0)
    assert pool.free_slots() == 2
    pool = PoolSnapshot([view(a, 9, 8, 1), view(b, 9, 8, 1)], queue_threshold=5.0, queue_wait_s=1.0)
    assert pool.free_slots() == 0


def test_a_fast_engine_keeps_the_count_threshold():
    """A GPU engine finishing 40 requests a second while full starts five waiting ones in 125 ms."""
    drain = EngineDrain()
    feed(drain, [(t * 0.05, scrape(256, 3, 2 * t, cap=256)) for t in range(100)])
    assert drain.seconds_per_completion() == pytest.approx(0.025, rel=0.1)
    snap = PoolSnapshot([], queue_threshold=5.0, queue_wait_s=1.0)
    assert snap.queue_limit(view(drain, 256, 256, cap=256)) == 5.0
    assert snap.room(view(drain, 258, 256, waiting=2, cap=256)) == 3


def test_completions_under_light_load_say_nothing_about_capacity():
    drain = EngineDrain()
    # two running of a batch of 8, completing one a second: the arrival rate, not the engine's pace
    feed(drain, [(float(t), scrape(2, 0, t)) for t in range(30)])
    assert drain.seconds_per_completion() is None
    assert PoolSnapshot([], queue_threshold=5.0).queue_limit(view(drain, 2, 2)) == 5.0


def test_a_stall_raises_the_estimate_and_a_restart_does_not_count_backwards():
    drain = EngineDrain()
    feed(drain, [(t * 0.5, scrape(8, 2, t)) for t in range(40)])  # two completions a second while full
    assert drain.seconds_per_completion() == pytest.approx(0.5, rel=0.1)
    feed(drain, [(19.5 + t, scrape(8, 2, 39)) for t in range(1, 31)])  # then nothing for 30 s
    assert drain.seconds_per_completion() > 1.0
    feed(drain, [(50.0, scrape(0, 0, 0)), (51.0, scrape(8, 1, 0)), (52.0, scrape(8, 1, 1))])
    assert drain.seconds_per_completion() is not None and drain.seconds_per_completion() > 0


# (seconds, running, waiting, finished): the changes seen scraping an emulated CPU engine (batch cap 4) every
# 50 ms while 12 requests of 48 tokens arrived at once (`engine serve --emulate cpu:smollm2-135m --max-num-seqs 4`)
RECORDED = [(0.21, 0, 0, 0), (0.33, 1, 0, 0), (0.75, 4, 8, 0), (6.18, 4, 7, 1), (6.45, 4, 4, 4), (11.86, 4, 3, 5),
            (12.19, 4, 0, 8), (17.92, 3, 0, 9)]


def test_recorded_scrapes_of_a_cpu_engine_bound_its_queue_to_one():
    drain = EngineDrain()
    rows = []
    for (t, running, waiting, finished), nxt in zip(RECORDED, [*RECORDED[1:], (18.0,)], strict=True):
        rows += [(t + k * 0.05, scrape(running, waiting, finished, cap=4)) for k in range(int((nxt[0] - t) / 0.05))]
    feed(drain, rows[:rows.index(next(r for r in rows if r[0] >= 6.45))])
    assert drain.seconds_per_completion() is None or drain.seconds_per_completion() > 5  # one completion, 5.4 s
    feed(drain, rows)
    # the engine finishes its batch of 4 every ~5.5 s: ~1.4-1.9 s per completion, so a 1 s budget allows < 1 waiting
    assert 1.2 < drain.seconds_per_completion() < 2.5
    snap = PoolSnapshot([], queue_threshold=5.0, queue_wait_s=1.0)
    assert snap.room(view(drain, in_flight=4, running=4, cap=4)) == 1
    assert snap.room(view(drain, in_flight=12, running=4, waiting=8, cap=4)) == -7  # the burst before it was known


class _Body:
    """One scrape response from a fake engine (what `UpstreamPool.request` hands back)."""

    status = 200

    def __init__(self, text: str) -> None:
        self._text = text.encode()

    async def read(self) -> bytes:
        return self._text

    def release(self) -> None:
        pass


class _Engine:
    """The scrape pool of an engine whose /metrics text is set by the test."""

    text = ""

    async def request(self, method: bytes, path: bytes, headers: list, body: bytes) -> _Body:
        return _Body(self.text)


def test_an_unchanged_metrics_text_still_feeds_the_drain_so_a_stall_is_seen(monkeypatch):
    """The scrape loop skips parsing a body equal to the last one (an idle engine); a full engine that stops
    completing also sends the same text, and its drain estimate must still rise with the time that passes."""
    import asyncio

    from inferstack.config.schema import GatewayConfig
    from inferstack.gateway import datalayer
    from inferstack.gateway.datalayer import DataLayer, Endpoint

    clock = [0.0]
    monkeypatch.setattr(datalayer.time, "monotonic", lambda: clock[0])
    ep = Endpoint("http://127.0.0.1:1", None, None, None, None)
    engine = _Engine()
    ep.scrape = engine
    layer = DataLayer([], GatewayConfig())

    async def scrapes(rows: list[tuple[float, str]]) -> None:
        for t, text in rows:
            clock[0], engine.text = t, text
            await layer._scrape_one(ep, t)

    asyncio.run(scrapes([(t * 0.5, scrape(8, 2, t)) for t in range(40)]))  # two completions a second
    assert ep.drain_s == pytest.approx(0.5, rel=0.1)
    asyncio.run(scrapes([(19.5 + t, scrape(8, 2, 39)) for t in range(1, 31)]))  # the same text for 30 s
    assert ep.drain_s > 1.0


def test_the_pool_reads_its_engines_pace_and_whether_every_engine_is_full():
    pool = Pool.from_config("p", PoolConfig(endpoints=["http://127.0.0.1:1", "http://127.0.0.1:2"]), GatewayConfig())
    assert pool.engines_pace() is None and not pool.engines_full()  # nothing scraped yet
    a, b = pool.endpoints
    a.metrics, b.metrics = parse_engine_metrics(scrape(8, 0, 0)), parse_engine_metrics(scrape(1, 0, 0))
    a.drain, a.drain_s = slow_engine(), 7.5
    b.drain_s = 4.0  # full for a while without a completion: a lower bound, not a pace
    assert not b.drain.measured() and a.drain.measured()
    assert pool.engines_pace() == pytest.approx(3.75)  # the unmeasured engine taken as fast as the other
    assert not pool.engines_full()  # b has room: the gateway's hold does not apply
    b.metrics = parse_engine_metrics(scrape(1, 2, 0))  # one running, two waiting (a cold prefill's token budget)
    assert pool.engines_full()
    b.active_ok = False  # an unhealthy engine neither counts nor blocks
    assert pool.engines_full() and pool.engines_pace() == pytest.approx(7.5)
