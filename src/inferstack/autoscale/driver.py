"""Drive a policy per pool from a stream of fleet samples: the hook the simulator calls every
interval (`sim/autoscale.py`'s Autoscaler contract), and the loop a live actuator runs.

The policy stays pure; the driver only slices each pool's window out of the fleet samples, applies
the replica bounds and keeps the decisions for the report (time, pool, decision)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from inferstack.autoscale.decision import Bounds, Decision, Policy
from inferstack.autoscale.signals import PoolSample


class FleetSample(Protocol):
    """Samples of every pool at one instant."""

    @property
    def pools(self) -> Mapping[str, PoolSample]: ...


@dataclass
class PolicyAutoscaler:
    policy: Policy
    bounds: Bounds = field(default_factory=Bounds)
    interval_s: float = 15.0
    window_samples: int = 40
    cold_start_s: float = 60.0
    decisions: list[tuple[float, str, Decision]] = field(default_factory=list)

    def desired(self, window: Sequence[FleetSample], replicas: Mapping[str, int]) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for pool, current in replicas.items():
            samples = [w.pools[pool] for w in window if pool in w.pools]
            decision = self.bounds.apply(self.policy.decide(samples, current), samples)
            self.decisions.append((samples[-1].t if samples else 0.0, pool, decision))
            out[pool] = decision.desired
        return out
