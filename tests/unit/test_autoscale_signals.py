"""The one sampling path (autoscale/load.py): the gateway's `PoolLoad` snapshot of a real `Pool`, carried as
JSON like the admin API does, differenced by `LoadSampler`: amounts since the previous snapshot, latencies
since it, spilled requests as held demand, starting replicas, PD roles."""

from __future__ import annotations

import time

import orjson
import pytest

from inferstack.autoscale.load import LoadSampler, LoadSnapshot
from inferstack.config.schema import GatewayConfig, PoolConfig
from inferstack.gateway.datalayer import Pool, ScrapedMetrics
from inferstack.gateway.poolload import PoolLoad, p95
from inferstack.protocol.errors import APIError


def _pool(pd: bool = False) -> Pool:
    eps = [{"url": "http://10.0.0.1:8000", "role": "prefill" if pd else "both"},
           {"url": "http://10.0.0.2:8000", "role": "decode" if pd else "both"}]
    cfg = PoolConfig.model_validate({"endpoints": eps, "models": ["m"], **({"pd": {"enabled": True}} if pd else {})})
    pool = Pool.from_config("p", cfg, GatewayConfig())
    for ep, running in zip(pool.endpoints, (3.0, 5.0), strict=True):
        ep.metrics, ep.metrics_at = ScrapedMetrics(queue=1.0, running=running, kv_usage=0.5), time.monotonic()
    return pool


def _over_http(snap: LoadSnapshot) -> LoadSnapshot:
    """What the local supervisor gets from `GET /admin/pools/{pool}/load`."""
    return LoadSnapshot.from_json(orjson.loads(orjson.dumps(snap.to_json())))


def test_amounts_and_latencies_are_since_the_previous_snapshot():
    pool, load, sampler = _pool(), PoolLoad(), LoadSampler()
    first = sampler.sample(_over_http(load.snapshot(pool, sampler.since, held=0, queued=1)), starting=2)["both"]
    assert (first.replicas, first.starting, first.waiting, first.running) == (2, 2, 2, 8)
    assert first.kv_usage == pytest.approx(0.5) and first.arrivals == 0 and first.ttft_p95_s is None
    assert first.gateway_queued == 1
    for ttft in [0.1] * 18 + [3.0] * 2:                  # 20 finished: the slowest 10 % set the p95
        load.arrived()
        load.finished_request(ttft, 0.05, 100, 10)
    for _ in range(3):
        load.arrived()                                   # still in flight at the gateway
    pool.endpoints[0].in_flight = 12                     # more than the engines report (8 running, 2 waiting)
    snap = load.snapshot(pool, sampler.since, held=2, queued=0)
    second = sampler.sample(_over_http(snap))["both"]
    assert (second.arrivals, second.completions, second.input_tokens, second.output_tokens) == (23, 20, 2000, 200)
    assert second.ttft_p95_s == 3.0 and second.tpot_p95_s == 0.05 and second.gateway_queued == 2
    assert second.running == 10                          # 12 in flight - 2 waiting
    assert second.interval_s == pytest.approx(snap.now - first.t)
    third = sampler.sample(load.snapshot(pool, sampler.since, 0, 0))["both"]   # in process, as Kubernetes does
    assert (third.arrivals, third.completions, third.ttft_p95_s, third.gateway_queued) == (0, 0, None, 0)
    for _ in range(4):                                   # overflow to the fallback is demand for this pool
        load.arrived()
        load.spilled_over()
    fourth = sampler.sample(load.snapshot(pool, sampler.since, 0, 0))["both"]
    assert (fourth.arrivals, fourth.gateway_queued) == (4, 4)


def test_pd_pool_samples_each_role():
    pool = _pool(pd=True)
    snap = PoolLoad().snapshot(pool, 0.0, 0, 0, {"10.0.0.1:8000": "prefill", "10.0.0.2:8000": "decode"})
    samples = LoadSampler().sample(_over_http(snap), {"prefill": 0, "decode": 2})
    assert set(samples) == {"prefill", "decode"}
    assert (samples["prefill"].replicas, samples["prefill"].running) == (1, 3)
    assert (samples["decode"].replicas, samples["decode"].running, samples["decode"].starting) == (1, 5, 2)


def test_malformed_snapshot_is_refused_and_p95_is_nearest_rank():
    with pytest.raises(KeyError):
        LoadSnapshot.from_json({"pool": "p", "now": 1.0})
    with pytest.raises(TypeError):
        LoadSnapshot.from_json({"pool": "p", "now": 1.0, "endpoints": [{"id": "e", "bogus": 1}]})
    assert p95([]) is None
    assert p95([float(i) for i in range(1, 101)]) == 95.0


def test_duty_cycle_is_the_rate_of_the_engines_step_time():
    """`inferstack:busy_seconds_total` as the gateway scrapes it, differenced per endpoint: GPU utilisation."""
    from inferstack.autoscale.signals import signal_value
    from inferstack.gateway.datalayer import parse_engine_metrics

    text = ("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 2\n"
            "# TYPE inferstack:busy_seconds_total counter\ninferstack:busy_seconds_total{model_name=\"m\"} 10.0\n")
    assert parse_engine_metrics(text).busy_seconds == 10.0
    assert parse_engine_metrics(text.split("# TYPE inferstack")[0]).busy_seconds is None
    pool, load, sampler = _pool(), PoolLoad(), LoadSampler()
    for ep, busy in zip(pool.endpoints, (10.0, 4.0), strict=True):
        ep.metrics.busy_seconds = busy
    first = sampler.sample(_over_http(load.snapshot(pool, sampler.since, 0, 0)))["both"]
    assert first.busy is None                            # one end only: no rate yet
    before = sampler.prev
    pool.endpoints[0].metrics.busy_seconds = 10.0 + 0.9 * 2.0   # busy 90 % and 40 % of the next 2 s
    pool.endpoints[1].metrics.busy_seconds = 4.0 + 0.4 * 2.0
    snap = load.snapshot(pool, sampler.since, 0, 0)
    snap = LoadSnapshot(**{**snap.__dict__, "now": before.now + 2.0})
    second = sampler.sample(_over_http(snap))["both"]
    assert second.busy == pytest.approx(0.65) and signal_value("gpu_util", second) == pytest.approx(0.65)
    pool.endpoints[1].metrics.busy_seconds = None        # an engine without the counter drops out of the mean
    third = sampler.sample(LoadSnapshot(**{**load.snapshot(pool, 0, 0, 0).__dict__, "now": snap.now + 1.0}))
    assert third["both"].busy == 0.0


def test_misses_of_the_readers_objectives_are_counted_per_snapshot():
    """`missed`: the requests finished since the reader's previous snapshot that missed the objectives it gave
    (TTFT or TPOT over, or no first token), carried through JSON into `PoolSample.missed`; None without them."""
    from inferstack.autoscale.signals import Objectives
    from inferstack.gateway.admin import _objectives

    obj = Objectives(ttft_s=2.0, tpot_s=0.1)
    assert [obj.missed(*x) for x in ((0.5, 0.05), (2.5, 0.05), (0.5, 0.12), (None, None), (0.5, None), (2.0, 0.1))] \
        == [False, True, True, True, False, False]
    pool, load, sampler = _pool(), PoolLoad(), LoadSampler()
    sampler.sample(load.snapshot(pool, sampler.since, 0, 0, objectives=obj))
    for ttft, tpot in [(0.5, 0.05)] * 7 + [(3.0, 0.05), (0.5, 0.2), (None, None)]:
        load.finished_request(ttft, tpot, 10, 10)
    snap = load.snapshot(pool, sampler.since, 0, 0, objectives=obj)
    got = sampler.sample(_over_http(snap))["both"]
    assert (got.completions, got.missed) == (10, 3)
    assert load.snapshot(pool, 0.0, 0, 0, objectives=Objectives(10.0, 1.0)).missed == 1    # only the failed one
    assert sampler.sample(load.snapshot(pool, sampler.since, 0, 0, objectives=obj))["both"].missed == 0
    assert sampler.sample(_over_http(load.snapshot(pool, 0.0, 0, 0)))["both"].missed is None
    # the admin route's query: both objectives or neither
    assert _objectives(b"since=1.5&ttft=2&tpot=0.1") == obj and _objectives(b"since=1.5") is None
    for bad in (b"ttft=2", b"ttft=2&tpot=x", b"ttft=0&tpot=0.1"):
        with pytest.raises(APIError):
            _objectives(bad)
