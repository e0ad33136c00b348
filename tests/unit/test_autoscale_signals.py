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
