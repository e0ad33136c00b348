"""account: latency and token metrics, TPM settlement, the trace span and the audit record."""

from __future__ import annotations

import logging
import time
from typing import Any

from inferstack.compliance.audit import AuditLog, AuditRecord
from inferstack.gateway.auth import Identity
from inferstack.gateway.limits import Limiter, settle_reservation, settle_reservation_now
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pipeline.context import Inbound, Outcome, RequestContext
from inferstack.gateway.requests import prompt_parts
from inferstack.protocol.errors import APIError

log = logging.getLogger("inferstack.gateway.audit")


def used_tokens(out: Outcome, prompt_tokens: int) -> int:
    """What a request is charged: the engine's usage when it sent one; otherwise what demonstrably
    ran, the prompt once an engine took the request plus every chunk relayed (a stream cut short
    before its usage event, a client gone mid-stream)."""
    if out.usage_tokens is not None:
        return out.usage_tokens
    ran = out.streamed > 0 or (out.endpoint != "" and out.status in (0, 200, 499))
    return (prompt_tokens if ran else 0) + out.streamed


class Accountant:
    def __init__(self, metrics: GatewayMetrics, limiter: Limiter, audit: AuditLog | None):
        self.metrics = metrics
        self.limiter = limiter
        self.audit = audit

    def count(self, ctx: RequestContext) -> None:
        self.metrics.request_done(ctx.route.model, ctx.route.pool.name, ctx.outcome.endpoint,
                                  ctx.caller.ident.tenant, ctx.outcome.status)

    def finish(self, ctx: RequestContext, end: float, usage: Any, chunks: int) -> None:
        """A response completed at ``end``: observe latencies, count tokens (``chunks`` stands in
        for output tokens when the engine sent no usage). Plain, not async: it never waits, and every
        request runs it."""
        out, tname = ctx.outcome, ctx.caller.ident.tenant
        pool = ctx.route.pool.name
        ttft_h, tpot_h, e2e_h, itl_h = self.metrics.latency_children(
            (ctx.route.model, pool, out.endpoint, tname))
        e2e = end - ctx.inbound.t0
        e2e_h.observe(e2e)
        out_tokens, in_tokens = chunks, 0
        if isinstance(usage, dict):
            out_tokens = int(usage.get("completion_tokens") or 0)
            in_tokens = int(usage.get("prompt_tokens") or 0)
            out.usage_tokens = in_tokens + out_tokens
            self.metrics.tokens_used(ctx.route.model, pool, tname, in_tokens, out_tokens)
        if out.ttft is not None:
            ttft_h.observe(out.ttft)
            if out_tokens > 1:
                out.tpot = (e2e - out.ttft) / (out_tokens - 1)
                tpot_h.observe(out.tpot)
        if out.gaps:
            itl_h.observe_many(out.gaps)
        self.count(ctx)
        if ctx.span is not None:
            ctx.span.set_attribute("gen_ai.usage.input_tokens", in_tokens)
            ctx.span.set_attribute("gen_ai.usage.output_tokens", out_tokens)
        out.in_tokens, out.out_tokens = in_tokens, out_tokens

    async def close(self, ctx: RequestContext) -> None:
        """The request is over (served, failed or abandoned): settle its TPM reservation to what it
        used, end its span, write its audit record."""
        res = ctx.admission.tokens
        if res is not None:
            used = used_tokens(ctx.outcome, ctx.admission.prompt_tokens)
            if not settle_reservation_now(self.limiter, res, used):  # a shared store: a round trip
                await settle_reservation(self.limiter, res, used)
        if ctx.span is not None:
            ctx.span.set_attribute("http.response.status_code", ctx.outcome.status)
            ctx.span.set_attribute("inferstack.endpoint", ctx.outcome.endpoint)
            ctx.span.end()
        if self.audit is not None:
            await self._audit_done(ctx)

    # ---- audit (docs/compliance.md): one record per completion request, queued off the event loop ----
    async def _audit_done(self, ctx: RequestContext) -> None:
        assert self.audit is not None
        pool = ctx.route.pool.config
        digest = pool.model_digest or (
            f"sha256:{pool.precise_prefix.model_digest}" if pool.precise_prefix else None
        )
        prompt = "\n".join(prompt_parts(ctx.inbound.kind, ctx.body))  # hashed on the writer thread
        out = ctx.outcome
        await self._append(AuditRecord(
            model=ctx.route.model, status=out.status,
            latency_ms=round((time.perf_counter() - ctx.inbound.t0) * 1000, 3),
            tenant=ctx.caller.ident.tenant, key_id=ctx.caller.ident.key_id,
            request_id=ctx.inbound.rid.decode("latin-1"), model_digest=digest, endpoint=out.endpoint or None,
            prompt_tokens=out.in_tokens, completion_tokens=out.out_tokens, prompt=prompt,
            error="limits_unenforced: limit store unavailable" if ctx.admission.unenforced else None))

    async def rejected(
        self, inbound: Inbound, ident: Identity | None, model: str | None, exc: APIError
    ) -> None:
        """Audit a completion request refused before it was admitted (or with nothing admitted)."""
        if self.audit is None:
            return
        await self._append(AuditRecord(
            model=model, status=exc.status, latency_ms=round((time.perf_counter() - inbound.t0) * 1000, 3),
            tenant=ident.tenant if ident else None, key_id=ident.key_id if ident else None,
            request_id=inbound.rid.decode("latin-1"), error=exc.code or exc.message))

    async def _append(self, record: AuditRecord) -> None:
        assert self.audit is not None
        try:
            await self.audit.append(record)
        except RuntimeError as exc:
            # The writer stopped for good (not a full disk, which it rides out): admission already
            # refuses every request (`admits_requests` is False), so say so here, never a 500.
            log.error("audit record for request %s lost: %s", record.request_id, exc)
