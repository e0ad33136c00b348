"""admit: the audit writer's health, tenant RPM/TPM limits, then the pool's flow control (priority
bands, fair share, shed).

Every refusal is an APIError with the OpenAI envelope (and Retry-After where waiting helps); the
pipeline audits it. TPM reserves the request's worst case here; `account` settles it when the request ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from inferstack.config.schema import LimitsConfig
from inferstack.gateway.datalayer import Pool
from inferstack.gateway.flowcontrol import ClientGone, FlowController
from inferstack.gateway.limits import Limiter, LimitStoreError, Reservation, settle_reservation
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pipeline.context import Admission, Caller, Inbound, Route
from inferstack.gateway.routing import PoolSnapshot
from inferstack.protocol.errors import APIError
from inferstack.protocol.ids import bounded_key

log = logging.getLogger("inferstack.gateway")


class AuditHealth(Protocol):
    """What admission reads from the audit writer (`compliance.audit.AuditLog`)."""

    @property
    def admits_requests(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...


class _AskStore:
    """`Admitter._limits`'s answer when the limiter cannot answer without its store."""


_ASK_STORE = _AskStore()


def _retry_after(seconds: float) -> dict[str, str]:
    return {"retry-after": str(max(1, int(seconds + 0.999)))}


@dataclass(slots=True)
class _PoolSeen:
    """Flow control's free-slot check over a snapshot this request keeps (`Admission.snapshot`)."""

    pool: Pool
    snap: PoolSnapshot | None = None

    def free_slots(self) -> int:
        self.snap = self.pool.snapshot()
        return self.pool.free_slots(self.snap)


class Admitter:
    def __init__(self, limiter: Limiter, flow: Mapping[str, FlowController], metrics: GatewayMetrics,
                 limits: LimitsConfig, audit: AuditHealth | None = None):
        self.limiter = limiter
        self.flow = flow
        self.metrics = metrics
        self.limits = limits
        self.audit = audit
        self._store_logged = 0.0  # one log line per 10 s of a store outage, not one per request

    async def admit(self, inbound: Inbound, caller: Caller, route: Route, prompt_tokens: int,
                    reserve_tokens: int, client_gone: asyncio.Future | None = None) -> Admission:
        """Raises APIError(503) while no audit record could be written, APIError(429) with Retry-After
        when a limit or flow control refuses the request, ClientGone when the client leaves the queue."""
        if self.audit is not None and not self.audit.admits_requests:
            self.metrics.dependency_unavailable.labels("audit_log", "refused").inc()
            raise APIError(503, "The gateway cannot record requests right now (audit log unavailable); "
                           "retry shortly.", code="audit_unavailable", headers=_retry_after(5))
        unenforced = False
        try:
            tokens = self._limits(caller, reserve_tokens)
            if isinstance(tokens, _AskStore):
                tokens = await self._limits_from_store(caller, reserve_tokens)
        except LimitStoreError as exc:
            tokens, unenforced = None, self._store_failed(caller.ident.tenant, exc)
        fairness = inbound.headers.get(b"x-gateway-inference-fairness-id")
        pool = route.pool.name
        flow = self.flow[pool]
        try:
            flow_id = bounded_key(fairness.decode("latin-1")) if fairness else caller.ident.tenant
            weight = caller.tenant.weight if caller.tenant else 1.0
            seen = _PoolSeen(route.pool)
            # nearly every request passes: a plain call, the waiting coroutine only for one that queues
            waited = None if flow.passes(caller.priority, seen.free_slots) else await flow.wait(
                caller.priority, flow_id, weight, client_gone, seen.free_slots)
        except (APIError, ClientGone) as exc:
            if isinstance(exc, APIError):
                self.metrics.shed.labels(pool, "shed" if caller.priority < 0 else "queue").inc()
            if tokens is not None:  # never ran: give the whole reservation back
                await settle_reservation(self.limiter, tokens, 0)
            raise
        if waited is not None:
            self.metrics.queue_wait.labels(pool).observe(waited)
        # straight through: no suspension since the snapshot, so routing may reuse it; a waiter's is stale
        return Admission(flow, prompt_tokens, waited is not None, tokens, unenforced,
                         seen.snap if waited is None else None, flow_id, weight)

    def _store_failed(self, tenant: str, exc: LimitStoreError) -> bool:
        """Apply `limits.on_store_failure`: True (admit without limits) under `allow`, else raise 503."""
        policy = self.limits.on_store_failure
        action = "refused" if policy == "refuse" else "allowed"
        self.metrics.dependency_unavailable.labels("limit_store", action).inc()
        now = time.monotonic()
        if now - self._store_logged >= 10.0:
            self._store_logged = now
            log.warning("%s; on_store_failure: %s, so tenant %s's request is %s", exc, policy, tenant,
                        "admitted without limits" if policy == "allow" else "refused")
        if policy == "allow":
            return True
        raise APIError(503, "Rate limits cannot be checked right now (limit store unavailable); retry "
                       "shortly.", code="limit_store_unavailable",
                       headers=_retry_after(self.limits.store_retry_s)) from None

    def _limits(self, caller: Caller, reserve_tokens: int) -> Reservation | _AskStore | None:
        """Take one RPM token and reserve ``reserve_tokens`` of TPM (None without a TPM limit); `_ASK_STORE`
        when the limiter must ask its store (then `_limits_from_store`)."""
        tenant = caller.tenant
        if tenant is None or not (tenant.limits.rpm or tenant.limits.tpm):
            return None
        answer = self.limiter.acquire_now(caller.ident.tenant, tenant.limits, self._charge(caller, reserve_tokens))
        return _ASK_STORE if answer is None else self._granted(caller, reserve_tokens, answer)

    async def _limits_from_store(self, caller: Caller, reserve_tokens: int) -> Reservation | None:
        """`_limits` through the limiter's store (a round trip)."""
        assert caller.tenant is not None
        answer = await self.limiter.acquire(caller.ident.tenant, caller.tenant.limits,
                                            self._charge(caller, reserve_tokens))
        return self._granted(caller, reserve_tokens, answer)

    def _charge(self, caller: Caller, reserve_tokens: int) -> int:
        """The TPM tokens to reserve (0 without a TPM limit); APIError(429) when the limit can never hold them."""
        assert caller.tenant is not None
        tname, tpm = caller.ident.tenant, caller.tenant.limits.tpm
        if tpm and reserve_tokens > tpm:
            self.metrics.rate_limited.labels(tname, "tpm").inc()
            raise APIError(429, f"Request too large for tenant `{tname}`: it may use {reserve_tokens} tokens "
                           f"(prompts + max_tokens x n) and the limit is {tpm} tokens per minute. Lower "
                           "max_tokens or split the request.", code="tpm_request_too_large")
        return reserve_tokens if tpm else 0

    def _granted(self, caller: Caller, reserve_tokens: int, answer: tuple[float, str]) -> Reservation | None:
        """The limiter's answer: APIError(429) with Retry-After when it refused, else the TPM reservation."""
        assert caller.tenant is not None
        tname, limits = caller.ident.tenant, caller.tenant.limits
        wait, which = answer
        if wait > 0:
            self.metrics.rate_limited.labels(tname, which).inc()
            raise APIError(429, f"Rate limit reached for tenant `{tname}` ({which.upper()}).",
                           code=f"{which}_limit_exceeded", headers=_retry_after(wait))
        return Reservation(tname, limits, reserve_tokens) if limits.tpm else None
