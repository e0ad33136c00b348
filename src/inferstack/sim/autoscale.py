"""The autoscaler hook of the simulator: a policy sees a window of fleet metric samples and the
current replica counts, and answers the replica counts it wants.

The simulator samples every ``interval_s`` of virtual time, calls `Autoscaler.desired`, and applies
the answer: new replicas join the pool after ``cold_start_s`` (image pull, weight load, warm-up);
a scale-down first cancels replicas still starting (the newest order first), as the local actuator does,
then drains ready ones: they stop receiving requests at once and leave when their last request finishes.
The same policy objects run against the live fleet, fed by the gateway's metrics: `PoolSample` is the
autoscaling package's (`inferstack.autoscale.signals`), and `autoscale.driver.PolicyAutoscaler`
puts any of its policies (hpa, kpa, apa, slo, planner) behind this hook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from inferstack.autoscale.signals import PoolSample


@dataclass(frozen=True)
class MetricSample:
    pools: Mapping[str, PoolSample]


class Autoscaler(Protocol):
    """A scaling policy. ``window`` holds the most recent samples, oldest first (at most
    ``window_samples``); ``replicas`` the current count per pool, starting replicas included."""

    interval_s: float
    window_samples: int
    cold_start_s: float

    def desired(self, window: Sequence[MetricSample], replicas: Mapping[str, int]) -> Mapping[str, int]: ...


@dataclass
class QueueTarget:
    """A reference policy: enough replicas that each holds ``target`` requests (waiting + running),
    within [min_replicas, max_replicas]; scales down one replica per decision. It exists to exercise
    the hook; the autoscaling work brings the real policies."""

    target: float = 32.0
    min_replicas: int = 1
    max_replicas: int = 1000
    interval_s: float = 15.0
    window_samples: int = 4
    cold_start_s: float = 60.0

    def desired(self, window: Sequence[MetricSample], replicas: Mapping[str, int]) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for pool, n in replicas.items():
            samples = [w.pools[pool] for w in window if pool in w.pools]
            load = max((s.waiting + s.running + s.gateway_queued for s in samples), default=0)
            want = max(self.min_replicas, min(self.max_replicas, -(-int(load) // max(1, int(self.target)))))
            out[pool] = want if want >= n else max(want, n - 1)
        return out
