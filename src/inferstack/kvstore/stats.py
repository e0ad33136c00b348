"""Per-tier counters, kept as plain thread-safe numbers; ``metrics.py`` exposes them to Prometheus."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Latency buckets (seconds) from a RAM hit (~100 µs) to a slow remote read of a big chunk.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        return out


@dataclass
class TierStats:
    """Cumulative counters of one tier; chunks and bytes, never tokens (the connector counts tokens)."""

    hits: int = 0                 # chunks found by get
    misses: int = 0               # chunks asked for and not found (including corrupt ones)
    read_bytes: int = 0
    write_bytes: int = 0
    writes: int = 0
    evictions: int = 0
    corrupt: int = 0              # chunks that failed validation and were deleted
    errors: int = 0               # tier operations that raised (e.g. Redis down); treated as misses
    read_seconds: Histogram = field(default_factory=Histogram)
    write_seconds: Histogram = field(default_factory=Histogram)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def observe_read(self, seconds: float, nbytes: int) -> None:
        with self.lock:
            self.read_seconds.observe(seconds)
            self.hits += 1
            self.read_bytes += nbytes

    def observe_write(self, seconds: float, nbytes: int) -> None:
        with self.lock:
            self.write_seconds.observe(seconds)
            self.writes += 1
            self.write_bytes += nbytes
