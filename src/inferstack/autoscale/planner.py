"""Dynamo's SLA planner: forecast the next interval's request rate and input/output lengths, then
size the fleet from throughput tables measured offline (an emulator sweep), corrected by how far
the observed latencies are from what the tables predict.

    prefill replicas = ceil(rate * isl * min(1, prefill_corr) / prefill_tokens_per_s)
    decode replicas  = ceil(rate * osl / decode_tokens_per_s at ITL <= target / decode_corr)

with prefill_corr = observed TTFT / expected TTFT and decode_corr = observed TPOT / expected ITL.
A colocated pool does both on the same replicas, so it needs the sum of the two fractions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from inferstack.autoscale.decision import Decision, ceil_div, stabilised_down
from inferstack.autoscale.forecast import Constant, Forecaster
from inferstack.autoscale.signals import PoolSample


@dataclass(frozen=True)
class DecodePoint:
    """One row of the decode sweep: per-replica concurrency, the ITL it gives, its tokens/s."""

    concurrency: float
    itl_s: float
    tokens_per_s: float


@dataclass(frozen=True)
class Planner:
    prefill_tokens_per_s: float = 8000.0         # one replica's prefill throughput (sweep)
    decode_table: tuple[DecodePoint, ...] = (DecodePoint(1, 0.02, 50), DecodePoint(16, 0.03, 530),
                                             DecodePoint(64, 0.05, 1280))
    ttft_p95_s: float = 1.0
    itl_s: float = 0.05
    forecaster: Forecaster = field(default_factory=Constant)
    correction: bool = True
    history: int = 12                            # samples the forecaster sees
    # colocated pools: square-root-staffing headroom (need + spare x sqrt(need)) and a scale-down
    # stabilisation (the highest plan of the window, at most max_step_down removed per decision);
    # 0 and 0 s are Dynamo's planner as published: the plan of the newest sample, no headroom
    spare: float = 0.0
    scale_down_stabilization_s: float = 0.0
    max_step_down: float = 1.0
    name: str = "planner"

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or not self.decode_table:
            raise ValueError("planner: prefill_tokens_per_s > 0 and a non-empty decode table")
        if self.spare < 0 or self.scale_down_stabilization_s < 0 or not 0 < self.max_step_down <= 1:
            raise ValueError("planner: spare >= 0, scale_down_stabilization >= 0 and 0 < max_step_down <= 1")

    def decode_capacity(self, itl_target: float) -> float:
        """Best tokens/s of one replica with ITL within the target (the first row if none is)."""
        ok = [p.tokens_per_s for p in self.decode_table if p.itl_s <= itl_target]
        return max(ok) if ok else self.decode_table[0].tokens_per_s

    def expected_itl(self, concurrency: float) -> float:
        """ITL at this per-replica concurrency, interpolated linearly in the table."""
        rows = sorted(self.decode_table, key=lambda p: p.concurrency)
        if concurrency <= rows[0].concurrency:
            return rows[0].itl_s
        for a, b in itertools.pairwise(rows):
            if concurrency <= b.concurrency:
                f = (concurrency - a.concurrency) / (b.concurrency - a.concurrency)
                return a.itl_s + f * (b.itl_s - a.itl_s)
        return rows[-1].itl_s

    def forecast(self, window: Sequence[PoolSample]) -> tuple[float, float, float]:
        """(requests/s, input tokens per request, output tokens per request) for the next interval."""
        recent = [s for s in window if s.interval_s > 0][-self.history:]
        rate = self.forecaster.next([s.request_rate for s in recent])
        isl = self.forecaster.next([s.input_tokens / s.arrivals for s in recent if s.arrivals]) or 0.0
        osl = self.forecaster.next([s.output_tokens / s.completions for s in recent if s.completions]) or 0.0
        return rate, isl, osl

    def corrections(self, window: Sequence[PoolSample], isl: float) -> tuple[float, float]:
        if not self.correction or not window:
            return 1.0, 1.0
        s = window[-1]
        prefill = decode = 1.0
        if s.ttft_p95_s is not None and isl > 0:
            prefill = s.ttft_p95_s / (isl / self.prefill_tokens_per_s)
        if s.tpot_p95_s is not None:
            decode = s.tpot_p95_s / self.expected_itl(s.running / max(1, s.replicas))
        return prefill, decode

    def plan(self, window: Sequence[PoolSample]) -> tuple[float, float, str]:
        """(prefill replicas, decode replicas) as fractions, and the reasoning."""
        rate, isl, osl = self.forecast(window)
        p_corr, d_corr = self.corrections(window, isl)
        prefill = rate * isl * min(1.0, p_corr) / self.prefill_tokens_per_s
        decode = rate * osl / self.decode_capacity(self.itl_s / max(d_corr, 1e-9))
        why = (f"forecast {rate:.2f} req/s x {isl:.0f} in / {osl:.0f} out ({self.forecaster.name}); "
               f"corrections prefill {p_corr:.2f} decode {d_corr:.2f}")
        return prefill, decode, why

    def decide(self, window: Sequence[PoolSample], current: int) -> Decision:
        """A colocated pool: its replicas prefill and decode, so it needs both shares together."""
        if not window:
            return Decision(self.name, current, current, "no samples")
        _, _, why = self.plan(window)
        wanted = ceil_div(self.need(window), 1.0)
        desired = stabilised_down(window, current, wanted, self.need, self.scale_down_stabilization_s,
                                  self.max_step_down)
        if desired > wanted:
            why += f"; scale-down held by the {self.scale_down_stabilization_s:g}s stabilisation window"
        return Decision(self.name, current, desired, why)

    def need(self, window: Sequence[PoolSample]) -> float:
        """Replicas (a fraction) a colocated pool needs: both shares and the headroom."""
        prefill, decode, _ = self.plan(window)
        return prefill + decode + self.spare * math.sqrt(prefill + decode)

    def decide_roles(
        self, window: Sequence[PoolSample], prefill_now: int, decode_now: int
    ) -> tuple[Decision, Decision]:
        """A disaggregated pool: prefill and decode replicas sized separately."""
        prefill, decode, why = self.plan(window)
        return (Decision(self.name, prefill_now, math.ceil(prefill - 1e-9), why),
                Decision(self.name, decode_now, math.ceil(decode - 1e-9), why))
