"""Knative's KPA over total demand (not a per-pod average: AIBrix's copy divides by the pod count
and then forgets to multiply back). Stable window 60 s, panic window 6 s; panic when the panic
window wants >= 2x the ready replicas; in panic the count never decreases; outside it the stable
window decides, within [R/2, 1000 R] per decision."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from inferstack.autoscale.decision import Decision, ceil_div
from inferstack.autoscale.signals import PoolSample, mean, within


@dataclass(frozen=True)
class KPA:
    target: float = 8.0               # requests in flight per replica (container-concurrency x util)
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    name: str = "kpa"

    def __post_init__(self) -> None:
        if self.target <= 0 or self.panic_window_s <= 0 or self.stable_window_s < self.panic_window_s:
            raise ValueError("kpa: target > 0 and 0 < panic_window_s <= stable_window_s")

    def _wanted(self, window: Sequence[PoolSample], seconds: float) -> int:
        demand = mean([float(s.demand) for s in within(window, seconds)]) or 0.0
        return ceil_div(demand, self.target)

    def _panicking(self, window: Sequence[PoolSample]) -> bool:
        """Panic holds while any moment of the last stable window wanted >= threshold x ready."""
        recent = within(window, self.stable_window_s)
        for i in range(len(recent)):
            upto = window[: len(window) - len(recent) + i + 1]
            ready = max(1, upto[-1].replicas)
            if self._wanted(upto, self.panic_window_s) / ready >= self.panic_threshold:
                return True
        return False

    def decide(self, window: Sequence[PoolSample], current: int) -> Decision:
        if not window:
            return Decision(self.name, current, current, "no samples")
        ready = max(1, window[-1].replicas)
        lo, hi = math.floor(ready / self.max_scale_down_rate), math.ceil(self.max_scale_up_rate * ready)
        stable = min(hi, max(lo, self._wanted(window, self.stable_window_s)))
        panic = min(hi, max(lo, self._wanted(window, self.panic_window_s)))
        if self._panicking(window):
            desired = max(stable, panic, current)
            return Decision(self.name, current, desired, f"panic: {self.panic_window_s:g}s demand wants {panic}")
        return Decision(self.name, current, stable,
                        f"{self.stable_window_s:g}s demand over target {self.target:g} per replica")
