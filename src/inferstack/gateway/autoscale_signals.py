"""Autoscaling signals from what the gateway (or the EPP) already knows about a pool: the engines'
scraped queue/running/KV gauges, the requests flow control holds, and the gateway's own request
counters and latency histograms turned into amounts *since the previous sample* (policies never see
a cumulative counter, `autoscale/signals.py`).

Arrivals are counted by conservation: requests finished or shed since the previous sample plus the
change in requests in the system (in flight at the endpoints + held by flow control). Requests
spilled over to a fallback pool since the previous sample count as arrivals *and* as held demand:
a pool that spills never queues, so without them a demand-based policy would never see that it is
short of replicas and would leave the overflow to the fallback for good. For a PD pool
each role gets its own sample (its endpoints' gauges); arrivals, held requests and latencies are the
pool's, since every request needs both roles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from inferstack.autoscale.signals import PoolSample
from inferstack.gateway.datalayer import Pool
from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.routing.disagg import PDRouter
from inferstack.telemetry.promtext import histogram_quantile


@dataclass(frozen=True)
class _Totals:
    """The pool's cumulative counts at one instant (only ever differenced)."""

    done: float
    shed: float
    spilled: float
    in_system: int
    ttft: Mapping[float, float]
    tpot: Mapping[float, float]


def _counter_sum(samples: Iterable, name: str, pool: str) -> float:
    return sum(s.value for s in samples if s.name == name and s.labels.get("pool") == pool)


def _buckets(metric, pool: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for fam in metric.collect():
        for s in fam.samples:
            if s.name.endswith("_bucket") and s.labels.get("pool") == pool:
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return out


def _delta_p95(now: Mapping[float, float], before: Mapping[float, float] | None) -> float | None:
    delta = {le: v - (before or {}).get(le, 0.0) for le, v in now.items()}
    return histogram_quantile(0.95, delta)


@dataclass
class PoolSampler:
    """Samples one pool every interval; keeps the previous totals to difference against."""

    pool: Pool
    flow: FlowController
    metrics: GatewayMetrics
    _prev: _Totals | None = None
    _prev_t: float = 0.0

    def roles(self) -> dict[str, list]:
        """Endpoints by PD role: {"both": all} for an aggregated pool."""
        router = self.pool.router
        if not isinstance(router, PDRouter):
            return {"both": list(self.pool.endpoints)}
        out: dict[str, list] = {"prefill": [], "decode": []}
        for ep in self.pool.endpoints:
            role = router.roles.get(ep.id, "both")
            for r in ("prefill", "decode") if role == "both" else (role,):
                out[r].append(ep)
        return out

    def _totals(self) -> _Totals:
        name = self.pool.name
        done = sum(_counter_sum(f.samples, "inferstack_gateway_requests_total", name)
                   for f in self.metrics.requests.collect())
        shed = sum(_counter_sum(f.samples, "inferstack_gateway_shed_total", name)
                   for f in self.metrics.shed.collect())
        spilled = sum(_counter_sum(f.samples, "inferstack_gateway_spillover_total", name)
                      for f in self.metrics.spillover.collect())
        in_system = sum(e.in_flight for e in self.pool.endpoints) + self.flow.queued
        return _Totals(done, shed, spilled, in_system, _buckets(self.metrics.ttft, name),
                       _buckets(self.metrics.tpot, name))

    def sample(self, t: float, desired: Mapping[str, int]) -> dict[str, PoolSample]:
        """One PoolSample per role at time ``t``; ``desired`` is each role's replicas asked for (the
        Deployment's spec.replicas), so the ones not serving yet count as starting."""
        now, prev = self._totals(), self._prev
        spilled = 0 if prev is None else max(0, round(now.spilled - prev.spilled))
        arrivals = 0 if prev is None else max(0, round((now.done - prev.done) + (now.shed - prev.shed)
                                                       + (now.in_system - prev.in_system)) + spilled)
        completions = 0 if prev is None else max(0, round(now.done - prev.done))
        ttft = None if prev is None else _delta_p95(now.ttft, prev.ttft)
        tpot = None if prev is None else _delta_p95(now.tpot, prev.tpot)
        interval = t - self._prev_t if prev is not None else 0.0
        self._prev, self._prev_t = now, t
        out: dict[str, PoolSample] = {}
        for role, eps in self.roles().items():
            serving = [e for e in eps if e.healthy]
            scraped = [e.metrics for e in serving if e.metrics is not None]
            waiting = sum(m.queue for m in scraped)
            # the engine's own count when scraped, else what the gateway has in flight there
            running = sum(e.metrics.running if e.metrics is not None else e.in_flight for e in serving)
            kv = sum(m.kv_usage for m in scraped) / len(scraped) if scraped else 0.0
            out[role] = PoolSample(
                t=t, replicas=len(serving), starting=max(0, desired.get(role, len(serving)) - len(serving)),
                waiting=int(waiting), running=int(running), kv_usage=kv, gateway_queued=self.flow.queued + spilled,
                arrivals=arrivals, completions=completions, ttft_p95_s=ttft, tpot_p95_s=tpot,
                interval_s=interval)
        return out
