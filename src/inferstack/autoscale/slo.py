"""Latency objectives: scale on the windowed p95 TTFT and TPOT against the pool's objectives.

Up when either p95 misses its objective (by the ratio of the miss, at least one replica, at most
doubling) or when the replicas are saturated whatever the latencies say (queue per replica or KV
use over the guards: latencies lag a filling queue). Down by one replica only with headroom: every
sample of the stabilisation window under ``headroom`` x both objectives, nothing saturated, and the
remaining replicas would carry the demand at the current per-replica load. No finished request in
the window (no latency to judge) holds the count; the bounds decide about idleness."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inferstack.autoscale.decision import Decision
from inferstack.autoscale.signals import PoolSample, within


@dataclass(frozen=True)
class SLO:
    ttft_p95_s: float = 1.0
    tpot_p95_s: float = 0.1
    window_s: float = 60.0
    queue_guard: float = 5.0        # waiting requests per replica that mean saturated
    kv_guard: float = 0.9
    headroom: float = 0.5
    scale_down_stabilization_s: float = 120.0
    name: str = "slo"

    def __post_init__(self) -> None:
        if self.ttft_p95_s <= 0 or self.tpot_p95_s <= 0 or not 0 < self.headroom < 1:
            raise ValueError("slo: objectives must be > 0 and 0 < headroom < 1")

    def _miss(self, s: PoolSample) -> float | None:
        """The worse of p95 / objective for TTFT and TPOT; None without latencies."""
        ratios = [v / o for v, o in ((s.ttft_p95_s, self.ttft_p95_s), (s.tpot_p95_s, self.tpot_p95_s))
                  if v is not None]
        return max(ratios) if ratios else None

    def _saturated(self, s: PoolSample) -> bool:
        per = max(1, s.replicas)
        return (s.waiting + s.gateway_queued) / per >= self.queue_guard or s.kv_usage >= self.kv_guard

    def decide(self, window: Sequence[PoolSample], current: int) -> Decision:
        recent = within(window, self.window_s)
        misses = [m for m in (self._miss(s) for s in recent) if m is not None]
        if recent and self._saturated(recent[-1]):
            return Decision(self.name, current, min(2 * max(1, current), current + max(1, current // 2)),
                            "saturated (queue or KV over the guard)")
        if misses and max(misses) > 1.0:
            worst = max(misses)
            desired = min(2 * max(1, current), max(current + 1, round(current * worst)))
            return Decision(self.name, current, desired, f"p95 latency at {worst:.2f}x its objective")
        calm = within(window, self.scale_down_stabilization_s)
        calm_misses = [self._miss(s) for s in calm]
        spans = bool(window) and window[-1].t - window[0].t >= self.scale_down_stabilization_s
        if (current > 1 and spans and all(m is not None and m < self.headroom for m in calm_misses)
                and not any(self._saturated(s) for s in calm)):
            load = recent[-1].demand / max(1, recent[-1].replicas) if recent else 0.0
            if load * current / (current - 1) <= self.queue_guard:
                return Decision(self.name, current, current - 1,
                                f"p95 under {self.headroom:g}x the objectives for {self.scale_down_stabilization_s:g}s")
        return Decision(self.name, current, current, "objectives met" if misses else "no latency in the window")
