"""spill: while a pool cannot take a request now — no healthy replica (starting, scaled to zero) or
saturated (flow control would queue it) — send it to the pool's fallback (`pools.<name>.spillover`,
e.g. a remote OpenAI-compatible provider) if the fallback can take it at once.

Never spilled: requests of a `local_only` tenant, requests for a LoRA adapter (the fallback does not
have it) and anything the fallback cannot serve now (then the request stays local and waits in flow
control as usual). Each spill counts in `inferstack_gateway_spillover_total{pool,fallback,reason}`.
"""

from __future__ import annotations

from collections.abc import Mapping

from inferstack.gateway.datalayer import Pool
from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pipeline.context import Caller, Route


def has_room(pool: Pool, flow: FlowController) -> bool:
    """Flow control would pass a request straight through: nobody queued and a free slot left."""
    return flow.queued == 0 and pool.free_slots() - flow.pending > 0


def unavailable(pool: Pool, flow: FlowController) -> str | None:
    """Why ``pool`` cannot take a request now (`no_replica`, `saturated`), or None."""
    if not any(e.healthy for e in pool.endpoints):
        return "no_replica"
    if not has_room(pool, flow):
        return "saturated"
    return None


class Spiller:
    def __init__(self, pools: Mapping[str, Pool], flow: Mapping[str, FlowController], metrics: GatewayMetrics):
        self.pools = pools
        self.flow = flow
        self.metrics = metrics

    def divert(self, route: Route, caller: Caller) -> Route:
        """``route``, or the same request routed to the pool's fallback."""
        spill = route.pool.config.spillover
        if spill is None or route.adapter is not None or (caller.tenant is not None and caller.tenant.local_only):
            return route
        reason = unavailable(route.pool, self.flow[route.pool.name])
        if reason is None or reason not in spill.when:
            return route
        fallback = self.pools.get(spill.pool)
        if fallback is None or unavailable(fallback, self.flow[fallback.name]) is not None:
            return route
        self.metrics.spillover.labels(route.pool.name, fallback.name, reason).inc()
        return Route(route.model, fallback, spill.model or route.upstream_model, None)
