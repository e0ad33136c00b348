"""The gateway's pool state as autoscaling samples (gateway/autoscale_signals.py): counters and
histograms differenced between samples, arrivals by conservation, starting replicas, PD roles."""

from __future__ import annotations

import time

import pytest

from inferstack.config.schema import GatewayConfig, PoolConfig
from inferstack.gateway.autoscale_signals import PoolSampler
from inferstack.gateway.datalayer import Pool, ScrapedMetrics
from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.metrics import GatewayMetrics


def _sampler(pd: bool = False) -> PoolSampler:
    gw = GatewayConfig()
    eps = [{"url": "http://10.0.0.1:8000", "role": "prefill" if pd else "both"},
           {"url": "http://10.0.0.2:8000", "role": "decode" if pd else "both"}]
    cfg = PoolConfig.model_validate({"endpoints": eps, "models": ["m"], **({"pd": {"enabled": True}} if pd else {})})
    pool = Pool.from_config("p", cfg, gw)
    if pd:
        pool.router.roles.update({"10.0.0.1:8000": "prefill", "10.0.0.2:8000": "decode"})
    for ep, running in zip(pool.endpoints, (3.0, 5.0), strict=True):
        ep.metrics, ep.metrics_at = ScrapedMetrics(queue=1.0, running=running, kv_usage=0.5), time.monotonic()
    return PoolSampler(pool, FlowController(gw.flow_control, pool.free_slots), GatewayMetrics())


def test_amounts_are_since_the_previous_sample():
    s = _sampler()
    m = s.metrics
    first = s.sample(0.0, {"both": 4})["both"]
    assert (first.replicas, first.starting, first.waiting, first.running) == (2, 2, 2, 8)
    assert first.kv_usage == pytest.approx(0.5) and first.arrivals == 0 and first.ttft_p95_s is None
    for ttft in [0.1] * 18 + [3.0] * 2:                 # 20 finished: the slowest 10 % set the p95
        m.request_done("m", "p", "e", "t", 200)
        m.ttft.labels("m", "p", "e", "t").observe(ttft)
    m.shed.labels("p", "queue").inc(2)
    s.pool.endpoints[0].in_flight = 3                   # 3 still in flight: arrivals = 20 + 2 + 3
    second = s.sample(10.0, {"both": 2})["both"]
    assert (second.arrivals, second.completions, second.interval_s, second.starting) == (25, 20, 10.0, 0)
    assert 2.5 <= second.ttft_p95_s <= 5.0             # bucket (2.5, 5] of the 20 new observations
    third = s.sample(20.0, {"both": 2})["both"]        # nothing new: no latency, 3 in flight left over
    assert (third.arrivals, third.completions, third.ttft_p95_s, third.gateway_queued) == (0, 0, None, 0)
    m.spillover.labels("p", "cloud", "saturated").inc(4)  # overflow to the fallback is demand for this pool
    fourth = s.sample(30.0, {"both": 2})["both"]
    assert (fourth.arrivals, fourth.gateway_queued) == (4, 4)


def test_pd_pool_samples_each_role():
    s = _sampler(pd=True)
    samples = s.sample(0.0, {"prefill": 1, "decode": 3})
    assert set(samples) == {"prefill", "decode"}
    assert (samples["prefill"].replicas, samples["prefill"].running) == (1, 3)
    assert (samples["decode"].replicas, samples["decode"].running, samples["decode"].starting) == (1, 5, 2)
