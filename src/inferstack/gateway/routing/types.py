"""Snapshots the policies read: one request and the pool's endpoints at one instant."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

NEVER = float("inf")


@dataclass(slots=True)
class EndpointView:
    """One endpoint as the router sees it. Scraped fields are from the engine's /metrics."""

    id: str
    queue: float = 0.0          # requests waiting in the engine
    running: float = 0.0        # requests running in the engine
    kv_usage: float = 0.0       # 0..1
    metrics_age_s: float = NEVER  # seconds since the last successful scrape
    has_metrics: bool = False   # the endpoint exports a known queue/KV metric family at all
    in_flight: int = 0          # requests this gateway has sent and not yet finished
    healthy: bool = True        # active health check passes and not passively ejected
    max_concurrency: int | None = None
    adapters_active: frozenset[str] = frozenset()
    adapters_waiting: frozenset[str] = frozenset()
    max_lora: int = 0

    def stale(self, stale_after_s: float) -> bool:
        return self.has_metrics and self.metrics_age_s > stale_after_s

    def load(self) -> float:
        """Work at the endpoint: the gateway's own in-flight count, or the engine's if larger
        (other gateways send to it too)."""
        return max(float(self.in_flight), self.queue + self.running)


@dataclass(slots=True)
class PoolSnapshot:
    endpoints: Sequence[EndpointView]
    now: float = 0.0
    stale_after_s: float = 0.2
    queue_threshold: float = 5.0
    kv_threshold: float = 0.8

    def saturation(self, e: EndpointView) -> float:
        """GIE's utilization detector: max(Q/q_thr, KV/kv_thr), plus our in-flight cap.
        Stale metrics count as saturated (1.0)."""
        if not e.healthy or e.stale(self.stale_after_s):
            return 1.0
        s = 0.0
        if e.has_metrics:
            s = max(e.queue / self.queue_threshold, e.kv_usage / self.kv_threshold)
        if e.max_concurrency:
            s = max(s, e.in_flight / e.max_concurrency)
        return s

    def free_slots(self, include: Callable[[EndpointView], bool] = lambda e: True) -> int:
        """How many queued requests flow control may release now, over the endpoints ``include``
        keeps: the free concurrency of each unsaturated endpoint, or one per endpoint per metrics
        refresh when it has no cap (the engine's queue shows new work only after a scrape)."""
        free = 0
        for e in self.endpoints:
            if not include(e) or self.saturation(e) >= 1.0:
                continue
            free += e.max_concurrency - e.in_flight if e.max_concurrency else 1
        return free


@dataclass(slots=True)
class RequestView:
    """What routing needs from one request, computed once by the caller."""

    model: str
    prefix_hashes: Sequence[int] = ()   # approximate chain over the request text (see prefix.py)
    token_hashes: Sequence[bytes] = ()  # KV block hashes (precise index), when tokenized
    prompt_chars: int = 0
    adapter: str | None = None
    session: str | None = None
    priority: int = 0
    max_tokens: int = 64  # output tokens the request may produce (for latency prediction)

    @property
    def est_prompt_tokens(self) -> int:
        return max(1, self.prompt_chars // 4)
