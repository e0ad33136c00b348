"""account: latency and token metrics, TPM settlement, the trace span and the audit record."""

from __future__ import annotations

import time
from typing import Any

from inferstack.compliance.audit import AuditLog, AuditRecord
from inferstack.gateway.auth import Identity
from inferstack.gateway.limits import Limiter
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pipeline.context import Inbound, RequestContext
from inferstack.gateway.requests import prompt_parts
from inferstack.protocol.errors import APIError


class Accountant:
    def __init__(self, metrics: GatewayMetrics, limiter: Limiter, audit: AuditLog | None):
        self.metrics = metrics
        self.limiter = limiter
        self.audit = audit

    def count(self, ctx: RequestContext) -> None:
        self.metrics.request_done(
            ctx.route.model,
            ctx.route.pool.name,
            ctx.outcome.endpoint,
            ctx.caller.ident.tenant,
            ctx.outcome.status,
        )

    async def finish(self, ctx: RequestContext, end: float, usage: Any, chunks: int) -> None:
        """A response completed at ``end``: observe latencies, count tokens (``chunks`` stands in
        for output tokens when the engine sent no usage) and settle the tenant's TPM estimate."""
        out, tname = ctx.outcome, ctx.caller.ident.tenant
        pool = ctx.route.pool.name
        ttft_h, tpot_h, e2e_h, itl_h = self.metrics.latency_children(
            (ctx.route.model, pool, out.endpoint, tname)
        )
        e2e = end - ctx.inbound.t0
        e2e_h.observe(e2e)
        out_tokens, in_tokens = chunks, 0
        if isinstance(usage, dict):
            out_tokens = int(usage.get("completion_tokens") or 0)
            in_tokens = int(usage.get("prompt_tokens") or 0)
            self.metrics.tokens.labels(ctx.route.model, pool, tname, "input").inc(in_tokens)
            self.metrics.tokens.labels(ctx.route.model, pool, tname, "output").inc(out_tokens)
        if out.ttft is not None:
            ttft_h.observe(out.ttft)
            if out_tokens > 1:
                out.tpot = (e2e - out.ttft) / (out_tokens - 1)
                tpot_h.observe(out.tpot)
        for g in out.gaps:
            itl_h.observe(g)
        self.count(ctx)
        if ctx.span is not None:
            ctx.span.set_attribute("gen_ai.usage.input_tokens", in_tokens)
            ctx.span.set_attribute("gen_ai.usage.output_tokens", out_tokens)
        out.in_tokens, out.out_tokens = in_tokens, out_tokens
        tenant = ctx.caller.tenant
        if tenant is not None and tenant.limits.tpm and isinstance(usage, dict):
            await self.limiter.settle(tname, tenant.limits, in_tokens + out_tokens - ctx.admission.est_tokens)

    async def close(self, ctx: RequestContext) -> None:
        """The request is over (served, failed or abandoned): end its span, write its audit record."""
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
        await self.audit.append(
            AuditRecord(
                model=ctx.route.model,
                status=out.status,
                latency_ms=round((time.perf_counter() - ctx.inbound.t0) * 1000, 3),
                tenant=ctx.caller.ident.tenant,
                key_id=ctx.caller.ident.key_id,
                request_id=ctx.inbound.rid.decode("latin-1"),
                model_digest=digest,
                endpoint=out.endpoint or None,
                prompt_tokens=out.in_tokens,
                completion_tokens=out.out_tokens,
                prompt=prompt,
            )
        )

    async def rejected(
        self, inbound: Inbound, ident: Identity | None, model: str | None, exc: APIError
    ) -> None:
        """Audit a completion request refused before it was admitted (or with nothing admitted)."""
        if self.audit is None:
            return
        rid = inbound.headers.get(b"x-request-id")
        await self.audit.append(
            AuditRecord(
                model=model,
                status=exc.status,
                latency_ms=round((time.perf_counter() - inbound.t0) * 1000, 3),
                tenant=ident.tenant if ident else None,
                key_id=ident.key_id if ident else None,
                request_id=rid.decode("latin-1") if rid else None,
                error=exc.code or exc.message,
            )
        )
