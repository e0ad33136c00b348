"""Filters narrow the candidate endpoints. Those marked fail-open return the input unchanged
when they would remove every endpoint (GIE's behaviour): a busy endpoint beats a 503."""

from __future__ import annotations

from collections.abc import Callable

from inferstack.gateway.routing.state import RouteContext
from inferstack.gateway.routing.types import EndpointView

Filter = Callable[[RouteContext, list[EndpointView]], list[EndpointView]]


def healthy(ctx: RouteContext, cands: list[EndpointView]) -> list[EndpointView]:
    """Drop endpoints that fail health checks or are passively ejected (fail closed)."""
    return [e for e in cands if e.healthy]


def not_saturated(ctx: RouteContext, cands: list[EndpointView]) -> list[EndpointView]:
    """Drop saturated endpoints (queue as of now, KV, in-flight cap; `PoolSnapshot.saturation`); fail open."""
    snap = ctx.snapshot
    kept = [e for e in cands if snap.saturation(e) < 1.0]
    return kept or cands


def within_cap(cands: list[EndpointView]) -> list[EndpointView]:
    """The healthy endpoints below their `max_concurrency`, or all of ``cands`` when none is.

    Every router applies this before its policy: the cap is a promise to the engine, and flow
    control releases a request only when the pool has room, so a scorer with strong affinity
    (prefix, session) must not send it to a full endpoint instead. Queue room is deliberately not
    enforced here (see `PoolSnapshot.free_slots`). Fails open (flow control off, or a reserved slot
    taken meanwhile): a busy endpoint beats a 503."""
    kept = [e for e in cands if e.healthy and (not e.max_concurrency or e.in_flight < e.max_concurrency)]
    return kept or cands


# An endpoint is overloaded when its load exceeds twice the least-loaded endpoint's plus this slack;
# the relative bound keeps prefix affinity through ordinary imbalance (GIE's absolute queue/KV
# thresholds evict hot prefixes from their holder exactly when caching matters most). 16, not 8: at 8
# a Zipf-hot prefix left its holder at ordinary bursts (docs/gateway.md, "Presets"), and each copy on a
# second endpoint evicts another tenant's prefix there.
OVERLOAD_SLACK = 16.0


def not_overloaded(ctx: RouteContext, cands: list[EndpointView]) -> list[EndpointView]:
    """Drop endpoints whose load > 2 x min load + slack, and stale ones; never empties the list."""
    stale = ctx.snapshot.stale_after_s
    fresh = [e for e in cands if not e.stale(stale)] or cands
    loads = [e.load() for e in fresh]
    bound = 2.0 * min(loads) + OVERLOAD_SLACK
    return [e for e, v in zip(fresh, loads, strict=True) if v <= bound]


def lora_capable(ctx: RouteContext, cands: list[EndpointView]) -> list[EndpointView]:
    """For adapter requests keep endpoints with the adapter loaded or room to load it; fail open."""
    adapter = ctx.request.adapter
    if not adapter:
        return cands
    kept = [e for e in cands if adapter in e.adapters_active or adapter in e.adapters_waiting
            or (e.max_lora and len(e.adapters_active) + len(e.adapters_waiting) < e.max_lora)]
    return kept or cands


FILTERS: dict[str, Filter] = {
    "healthy": healthy,
    "not-saturated": not_saturated,
    "not-overloaded": not_overloaded,
    "lora-capable": lora_capable,
}
