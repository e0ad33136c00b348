"""What an autoscaler reads from the gateway about one pool: its `LoadSnapshot` (autoscale/load.py), served
as `GET /admin/pools/{pool}/load?since=T` to the local supervisor and taken in process by the Kubernetes
actuator; both difference successive snapshots with the same `LoadSampler`.

Counts (arrivals, spilled, completions, tokens) are cumulative since the gateway started. Latencies come
as p95 over the requests that finished after ``since``, a time on the gateway's own clock that the previous
snapshot returned as ``now``. Gauges (held, queued, in flight, the engines' waiting/running/KV) are read at
the moment of the call.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from inferstack.autoscale.load import EndpointLoad, LoadSnapshot
from inferstack.autoscale.signals import Objectives
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
    spilled: int = 0
    completions: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    finished: deque[tuple[float, float | None, float | None]] = field(default_factory=lambda: deque(maxlen=_RING))

    def arrived(self) -> None:
        self.arrivals += 1

    def spilled_over(self) -> None:
        self.spilled += 1

    def finished_request(self, ttft: float | None, tpot: float | None, in_tokens: int | None,
                         out_tokens: int | None) -> None:
        self.completions += 1
        self.input_tokens += in_tokens or 0
        self.output_tokens += out_tokens or 0
        self.finished.append((time.monotonic(), ttft, tpot))

    def snapshot(self, pool: Pool, since: float, held: int, queued: int,
                 roles: Mapping[str, str] | None = None, objectives: Objectives | None = None) -> LoadSnapshot:
        """``roles``: endpoint id -> PD role (a PD pool's router's); every endpoint `both` without.
        ``objectives``: count the requests finished after ``since`` that missed them (None: no count)."""
        now = time.monotonic()
        recent = [(a, b) for t, a, b in self.finished if t > since]
        eps = tuple(EndpointLoad(id=e.id, url=e.url, healthy=e.healthy, in_flight=e.in_flight,
                                 waiting=e.metrics.queue if e.metrics else 0.0,
                                 running=e.metrics.running if e.metrics else 0.0,
                                 kv_usage=e.metrics.kv_usage if e.metrics else 0.0,
                                 busy_seconds=e.metrics.busy_seconds if e.metrics else None,
                                 role=(roles or {}).get(e.id, "both"))
                    for e in pool.endpoints)
        return LoadSnapshot(pool=pool.name, now=now, arrivals=self.arrivals, completions=self.completions,
                            input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                            ttft_p95_s=p95([a for a, _ in recent if a is not None]),
                            tpot_p95_s=p95([b for _, b in recent if b is not None]),
                            held=held, queued=queued, endpoints=eps, spilled=self.spilled,
                            missed=sum(objectives.missed(a, b) for a, b in recent) if objectives else None)
