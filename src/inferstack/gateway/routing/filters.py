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
    """Drop saturated endpoints (queue, KV, stale metrics, in-flight cap); fail open."""
    snap = ctx.snapshot
    kept = [e for e in cands if snap.saturation(e) < 1.0]
    return kept or cands


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
    "lora-capable": lora_capable,
}
