"""AIBrix's APA: the window average u of a per-replica signal against target T with a tolerance
band; above 1 + up_tolerance scale to ceil(N u / T) (at most 2N), below 1 - down_tolerance to
ceil(N u / T) (at least N/2), otherwise hold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from inferstack.autoscale.decision import Decision, ceil_div
from inferstack.autoscale.signals import PoolSample, check_signal, mean, signal_value, within


@dataclass(frozen=True)
class APA:
    metric: str = "concurrency"
    target: float = 8.0
    up_tolerance: float = 0.1
    down_tolerance: float = 0.2
    window_s: float = 60.0
    name: str = "apa"

    def __post_init__(self) -> None:
        check_signal(self.metric)
        if self.target <= 0:
            raise ValueError("apa: target must be > 0")

    def decide(self, window: Sequence[PoolSample], current: int) -> Decision:
        u = mean([signal_value(self.metric, s) for s in within(window, self.window_s)])
        if u is None or current == 0:
            return Decision(self.name, current, current, f"no {self.metric} in the window")
        ratio = u / self.target
        if ratio > 1 + self.up_tolerance:
            return Decision(self.name, current, min(ceil_div(current * u, self.target), 2 * current),
                            f"{self.metric} {u:.3g} is {ratio:.2f}x target")
        if ratio < 1 - self.down_tolerance:
            return Decision(self.name, current, max(ceil_div(current * u, self.target), math.floor(current / 2)),
                            f"{self.metric} {u:.3g} is {ratio:.2f}x target")
        return Decision(self.name, current, current, "within the tolerance band")
