"""admit: tenant RPM/TPM limits, then the pool's flow control (priority bands, fair share, shed)."""

from __future__ import annotations

from collections.abc import Mapping

from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.limits import Limiter
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pipeline.context import Admission, Caller, Inbound, Route
from inferstack.protocol.errors import APIError


class Admitter:
    def __init__(self, limiter: Limiter, flow: Mapping[str, FlowController], metrics: GatewayMetrics):
        self.limiter = limiter
        self.flow = flow
        self.metrics = metrics

    async def admit(self, inbound: Inbound, caller: Caller, route: Route, prompt_chars: int) -> Admission:
        """Raises APIError(429) with Retry-After when a limit or flow control refuses the request."""
        est_tokens = max(1, prompt_chars // 4)
        tenant, tname = caller.tenant, caller.ident.tenant
        if tenant is not None and (tenant.limits.rpm or tenant.limits.tpm):
            wait, which = await self.limiter.acquire(tname, tenant.limits, est_tokens)
            if wait > 0:
                self.metrics.rate_limited.labels(tname, which).inc()
                raise APIError(
                    429,
                    f"Rate limit reached for tenant `{tname}` ({which.upper()}).",
                    code=f"{which}_limit_exceeded",
                    headers={"retry-after": str(max(1, int(wait + 0.999)))},
                )
        fairness = inbound.headers.get(b"x-gateway-inference-fairness-id")
        pool = route.pool.name
        flow = self.flow[pool]
        try:
            waited = await flow.admit(
                caller.priority,
                fairness.decode("latin-1") if fairness else tname,
                tenant.weight if tenant else 1.0,
            )
        except APIError:
            self.metrics.shed.labels(pool, "shed" if caller.priority < 0 else "queue").inc()
            raise
        if waited is not None:
            self.metrics.queue_wait.labels(pool).observe(waited)
        return Admission(flow, est_tokens, waited is not None)
