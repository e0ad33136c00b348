"""Kubernetes HPA: desired = ceil(N * value / target) on a per-replica signal, skipped within a 10 %
tolerance; scale-down takes the highest recommendation of the stabilisation window (300 s), and
scale-up is limited to max(+100 %, +4 replicas) per decision (the default policies)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inferstack.autoscale.decision import Decision, ceil_div
from inferstack.autoscale.signals import PoolSample, check_signal, signal_value, within


@dataclass(frozen=True)
class HPA:
    metric: str = "concurrency"
    target: float = 8.0
    tolerance: float = 0.1
    scale_down_stabilization_s: float = 300.0
    name: str = "hpa"

    def __post_init__(self) -> None:
        check_signal(self.metric)
        if self.target <= 0:
            raise ValueError("hpa: target must be > 0")

    def recommend(self, s: PoolSample, current: int) -> int:
        value = signal_value(self.metric, s)
        if value is None or s.replicas == 0:
            return current
        ratio = value / self.target
        if abs(ratio - 1.0) <= self.tolerance:
            return current
        return ceil_div(s.replicas * value, self.target)

    def decide(self, window: Sequence[PoolSample], current: int) -> Decision:
        if not window:
            return Decision(self.name, current, current, "no samples")
        now = self.recommend(window[-1], current)
        value = signal_value(self.metric, window[-1])
        if now > current:
            desired = min(now, max(2 * current, current + 4))
            return Decision(self.name, current, desired, f"{self.metric} {value:.3g} > target {self.target:g}")
        recent = [self.recommend(s, current) for s in within(window, self.scale_down_stabilization_s)]
        desired = min(current, max(recent))
        if desired < current:
            return Decision(self.name, current, desired,
                            f"{self.metric} below target for {self.scale_down_stabilization_s:g}s")
        return Decision(self.name, current, current, "within tolerance" if now == current else
                        f"scale-down held by the {self.scale_down_stabilization_s:g}s stabilisation window")
