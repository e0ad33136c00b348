"""What an autoscaler reads from the gateway about one pool: `GET /admin/pools/{pool}/load?since=T`.

Counts (arrivals, completions, tokens) are cumulative since the gateway started: the reader keeps
the previous answer and takes differences, so any number of readers can poll without stealing each
other's samples (one shared, drained window is how autoscalers ended up sharing one result).
Latencies come as p95 over the requests that finished after ``since``, a time on the gateway's own
clock that the previous answer returned as ``now``. Gauges (held, queued, in flight, the engines'
waiting/running/KV) are read at the moment of the call.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from inferstack.gateway.datalayer import Pool

_RING = 4096  # finished requests remembered per pool (at 100 req/s: 40 s, longer than any sample interval)


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class PoolLoad:
    arrivals: int = 0
    completions: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    finished: deque[tuple[float, float | None, float | None]] = field(default_factory=lambda: deque(maxlen=_RING))

    def arrived(self) -> None:
        self.arrivals += 1

    def finished_request(self, ttft: float | None, tpot: float | None, in_tokens: int | None,
                         out_tokens: int | None) -> None:
        self.completions += 1
        self.input_tokens += in_tokens or 0
        self.output_tokens += out_tokens or 0
        self.finished.append((time.monotonic(), ttft, tpot))

    def report(self, pool: Pool, since: float, held: int, queued: int) -> dict[str, Any]:
        now = time.monotonic()
        recent = [(a, b) for t, a, b in self.finished if t > since]
        ttfts = [a for a, _ in recent if a is not None]
        tpots = [b for _, b in recent if b is not None]
        endpoints = []
        for e in pool.endpoints:
            m = e.metrics
            endpoints.append({"id": e.id, "url": e.url, "healthy": e.healthy, "in_flight": e.in_flight,
                              "waiting": m.queue if m else 0.0, "running": m.running if m else 0.0,
                              "kv_usage": m.kv_usage if m else 0.0})
        return {"pool": pool.name, "now": now, "arrivals": self.arrivals, "completions": self.completions,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "ttft_p95_s": p95(ttfts), "tpot_p95_s": p95(tpots), "held": held, "queued": queued,
                "endpoints": endpoints}
