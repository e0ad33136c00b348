"""Filters narrow the candidate endpoints. Those marked fail-open return the input unchanged
when they would remove every endpoint (GIE's behaviour): a busy endpoint beats a 503."""

from __future__ import annotations

from collections.abc import Callable

from inferstack.gateway.routing.state import RouteContext
from inferstack.gateway.routing.types import EndpointView, PoolSnapshot

Filter = Callable[[RouteContext, list[EndpointView]], list[EndpointView]]


def healthy(ctx: RouteContext, cands: list[EndpointView]) -> list[EndpointView]:
    """Drop endpoints that fail health checks or are passively ejected (fail closed)."""
    return [e for e in cands if e.healthy]


def not_saturated(ctx: RouteContext, cands: list[EndpointView]) -> list[EndpointView]:
    """Drop saturated endpoints (queue as of now, KV, in-flight cap; `PoolSnapshot.saturation`); fail open."""
    snap = ctx.snapshot
    kept = [e for e in cands if snap.saturation(e) < 1.0]
    return kept or cands


def within_room(snap: PoolSnapshot, cands: list[EndpointView]) -> list[EndpointView]:
    """The healthy endpoints with room, or all of ``cands`` when none has any.

    Every router applies this before its policy. Room is the free part of `max_concurrency` and,
    while flow control is on (`snap.admits_by_room`), the queue left before saturation: flow control
    releases a request only when some endpoint has room, so a scorer with strong affinity (prefix,
    session) must not send it to a full endpoint instead. Fails open (every endpoint full, or a
    reserved slot taken meanwhile): a busy endpoint beats a 503."""
    if snap.admits_by_room:
        kept = [e for e in cands if e.healthy and snap.room(e) > 0]
    else:
        kept = [e for e in cands if e.healthy and (not e.max_concurrency or e.in_flight < e.max_concurrency)]
    return kept or cands


# An endpoint is overloaded when its load exceeds twice the least-loaded endpoint's plus this slack;
# the relative bound keeps prefix affinity through ordinary imbalance (GIE's absolute queue/KV
# thresholds evict hot prefixes from their holder exactly when caching matters most).
OVERLOAD_SLACK = 8.0


def not_overloaded(ctx: RouteContext, cands: list[EndpointView]) -> list[EndpointView]:
    """Drop endpoints whose load > 2 x min load + slack, and stale ones; never empties the list."""
    snap = ctx.snapshot
    fresh = [e for e in cands if not e.stale(snap.stale_after_s)] or cands
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
