"""A policy's answer, the contract every policy keeps, and the bounds applied to every answer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from inferstack.autoscale.signals import Objectives, PoolSample, within


@dataclass(frozen=True)
class Decision:
    """Desired replicas for one pool (or role), why, and from which policy."""

    policy: str
    current: int
    desired: int
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "hold"


class Policy(Protocol):
    """Pure: the same window and current count always give the same decision."""

    name: str

    def decide(self, window: Sequence[PoolSample], current: int) -> Decision: ...


def objectives_of(policy: object) -> Objectives | None:
    """The per-request objectives a policy steers by (`slo`'s), which its driver asks the source to count misses
    against (`PoolSample.missed`); None for policies without objectives."""
    found = getattr(policy, "objectives", None)
    return found if isinstance(found, Objectives) else None


@dataclass(frozen=True)
class Bounds:
    """Replica bounds every decision passes through. With ``min_replicas`` 0 a pool scales to zero
    after ``idle_s`` without arrivals or work, and back to one as soon as a request is held."""

    min_replicas: int = 1
    max_replicas: int = 100
    idle_s: float = 300.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"replica bounds need 0 <= min <= max and max >= 1, got {self.min_replicas}.."
                             f"{self.max_replicas}")

    def apply(self, d: Decision, window: Sequence[PoolSample]) -> Decision:
        desired = min(self.max_replicas, max(self.min_replicas, d.desired))
        reason = d.reason
        if desired == 0 and window:
            idle = (window[-1].t - window[0].t >= self.idle_s
                    and not any(s.arrivals or s.demand for s in within(window, self.idle_s)))
            if idle:
                reason = f"no request for {self.idle_s:g}s: scale to zero"
            elif d.current > 0:
                desired, reason = 1, f"{reason}; keep one replica until idle for {self.idle_s:g}s"
        if d.current == 0 and window and (window[-1].gateway_queued or window[-1].arrivals):
            desired, reason = max(desired, 1), "requests are waiting for a replica: scale from zero"
        if desired != d.desired and reason == d.reason:
            reason = f"{reason} (bounded to {self.min_replicas}..{self.max_replicas})"
        return Decision(d.policy, d.current, desired, reason)


def ceil_div(a: float, b: float) -> int:
    return math.ceil(a / b - 1e-9) if b > 0 else 0


def stabilised_down(window: Sequence[PoolSample], current: int, wanted: int,
                    need: Callable[[Sequence[PoolSample]], float], stabilization_s: float, max_step_down: float) -> int:
    """Fast up, slow down: below ``current``, the highest ``need`` (replicas, a fraction) of every window
    ending within the last ``stabilization_s`` (HPA's scale-down stabilisation on any sizing rule), and
    at most ``max_step_down`` of the replicas (at least one) removed per decision."""
    if wanted >= current:
        return wanted
    calm = within(window, stabilization_s)
    first = len(window) - len(calm)
    held = max(ceil_div(need(window[: first + i + 1]), 1.0) for i in range(len(calm)))
    floor = current - max(1, math.floor(current * max_step_down))
    return min(current, max(wanted, held, floor))
