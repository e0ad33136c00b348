"""The gateway's ASGI application: OpenAI-compatible front over engine pools.

Raw ASGI (no framework on the hot path): the body is read once, parsed once with orjson, mutated
(model, cache_salt, priority, stream_options) and serialized once; streamed responses are passed
through chunk by chunk, sniffing only for TTFT and the final usage event.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from inferstack.compliance.audit import AuditLog, AuditRecord
from inferstack.config.schema import EndpointConfig, InferstackConfig
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.gateway.auth import Identity, KeyStore
from inferstack.gateway.datalayer import DataLayer, Endpoint, Pool
from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.limits import Limiter, Limits, MemoryLimiter, RedisLimiter
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pd import PDLegs
from inferstack.gateway.requests import engine_priority, prompt_parts, session_key
from inferstack.gateway.routing import RequestView
from inferstack.gateway.routing.disagg import PDResult
from inferstack.gateway.routing.prefix import text_prefix_hashes
from inferstack.protocol.errors import APIError
from inferstack.protocol.openapi import engine_openapi
from inferstack.protocol.responses import model_card, model_list
from inferstack.protocol.sse import SSE_DONE, sse_raw
from inferstack.telemetry.dashboard import dashboard_asgi, scraping_state_provider

log = logging.getLogger("inferstack.gateway")

_PATHS = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}
_JSON = [(b"content-type", b"application/json")]
_SSE = (b"content-type", b"text/event-stream")
_SERVED = b"x-gateway-destination-endpoint-served"
_RETRYABLE = (aiohttp.ClientError, TimeoutError, OSError)


@dataclass(slots=True)
class _Target:
    pool: Pool
    weight: float
    upstream_model: str | None


@dataclass(slots=True)
class _Tenant:
    limits: Limits
    salt: str
    weight: float


class Gateway:
    """ASGI app. ``tracer_provider`` (OpenTelemetry) is optional; without one no spans are made."""

    def __init__(self, cfg: InferstackConfig, tracer_provider: Any = None, limiter: Limiter | None = None):
        self.cfg = cfg
        gw = cfg.gateway
        custom = {n: (p.filters, p.scorers, p.picker) for n, p in cfg.routing.profiles.items()}
        self.pools = {name: Pool.from_config(name, p, gw, custom) for name, p in cfg.pools.items()}
        self.models: dict[str, list[_Target]] = {}
        for name, m in cfg.models.items():
            targets = [_Target(self.pools[t.pool], t.weight, t.model or name) for t in m.targets]
            for alias in [name, *m.aliases]:
                self.models[alias] = targets
        self.keys = KeyStore(cfg)
        self.tenants: dict[str, _Tenant] = {
            n: _Tenant(Limits(t.rpm, t.tpm), t.cache_salt or n, t.weight) for n, t in cfg.tenants.items()}
        self.metrics = GatewayMetrics()
        self.pd = PDLegs(self.metrics.registry, gw)
        self.flow: dict[str, FlowController] = {}
        for name, pool in self.pools.items():
            self.flow[name] = FlowController(
                gw.flow_control, pool.free_slots,
                lambda prio, depth, _n=name: self.metrics.queue_depth.labels(_n, str(prio)).set(depth))
        self.limiter: Limiter = limiter or (RedisLimiter(gw.redis_url) if gw.redis_url else MemoryLimiter())
        self.datalayer = DataLayer(list(self.pools.values()), gw, on_refresh=lambda p: self.flow[p.name].pump())
        self.tracer = tracer_provider.get_tracer("inferstack.gateway") if tracer_provider is not None else None
        self._rng = random.Random()
        self._openapi = orjson.dumps(gateway_openapi())
        self._admin_enabled = gw.admin_api if gw.admin_api is not None else _is_loopback(gw.host)
        self._dashboard = dashboard_asgi("/dashboard", scraping_state_provider(
            lambda: generate_latest(self.metrics.registry).decode(), self._dashboard_endpoints))
        self.audit = AuditLog(cfg.audit) if cfg.audit is not None and cfg.audit.enabled else None

    # ---- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        t = scope["type"]
        if t == "http":
            await self._http(scope, receive, send)
        elif t == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.datalayer.start()
                except Exception as exc:  # report startup failures through the lifespan protocol
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self._warn_shared_models()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.datalayer.stop()
                await self.limiter.close()
                if self.audit is not None:
                    await self.audit.aclose()  # flushes every queued record to disk
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope["raw_path"].split(b"?", 1)[0] if scope.get("raw_path") else scope["path"].encode()
        method = scope["method"]
        kind = _PATHS.get(path)
        t0 = time.perf_counter()
        try:
            if kind is not None:
                if method != "POST":
                    raise APIError(405, f"Use POST for {path.decode()}.")
                await self._completion(kind, scope, receive, send)
            elif path == b"/health":
                await _respond(send, 200, b'{"status":"ok"}')
            elif path == b"/ready":
                ok = any(e.healthy for p in self.pools.values() for e in p.endpoints)
                await _respond(send, 200 if ok else 503,
                               b'{"status":"ready"}' if ok else b'{"status":"no healthy endpoint"}')
            elif path == b"/metrics":
                await _respond(send, 200, generate_latest(self.metrics.registry),
                               [(b"content-type", CONTENT_TYPE_LATEST.encode())])
            elif path == b"/v1/models":
                await self._list_models(scope, send)
            elif path == b"/openapi.json":
                await _respond(send, 200, self._openapi)
            elif path.startswith(b"/admin/pools"):
                await self._admin(path, method, scope, receive, send)
            elif path == b"/dashboard" or path.startswith(b"/dashboard/"):
                await self._dashboard(scope, receive, send)
            else:
                raise APIError(404, f"Unknown path {path.decode('latin-1')}.", code="not_found")
        except APIError as exc:
            await _error(send, exc)
            if kind is not None and self.audit is not None and not scope.get("inferstack.audited"):
                await self._audit_rejected(scope, exc, t0)

    async def _admin(self, path: bytes, method: str, scope: dict, receive: Any, send: Any) -> None:
        """GET /admin/pools: pools and endpoint state. PUT /admin/pools/{pool}/endpoints with
        {"endpoints": [{"url", "name"?}, ...]}: replace a pool's endpoints (desired state)."""
        if not self._admin_enabled:
            raise APIError(404, f"Unknown path {path.decode('latin-1')}.", code="not_found")
        parts = path.decode("latin-1").strip("/").split("/")
        if parts == ["admin", "pools"] and method == "GET":
            data = {name: [{"id": e.id, "url": e.url, "healthy": e.healthy, "in_flight": e.in_flight,
                            "models": sorted(e.models)} for e in p.endpoints] for name, p in self.pools.items()}
            await _respond(send, 200, orjson.dumps({"pools": data}))
            return
        if len(parts) != 4 or parts[3] != "endpoints":
            raise APIError(404, f"Unknown path {path.decode('latin-1')}.", code="not_found")
        if method != "PUT":
            raise APIError(405, "Use PUT with {\"endpoints\": [{\"url\": ...}, ...]}.")
        pool = self.pools.get(parts[2])
        if pool is None:
            raise APIError(404, f"Unknown pool `{parts[2]}`.", param="pool", code="pool_not_found")
        body = await _read_body(receive, _header(scope, b"content-length"), 1 << 20)
        try:
            raw = orjson.loads(body)
            items = raw["endpoints"] if isinstance(raw, dict) else None
            if not isinstance(items, list):
                raise TypeError
            wanted = [EndpointConfig.model_validate({k: v for k, v in e.items() if k in ("url", "name")})
                      for e in items]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValidationError) as exc:
            raise APIError(400, f"Expected {{\"endpoints\": [{{\"url\": \"http://...\"}}, ...]}}: {exc}",
                           param="endpoints") from None
        await self.datalayer.set_endpoints(pool, wanted)
        await _respond(send, 200, orjson.dumps({"pool": pool.name, "endpoints": [e.id for e in pool.endpoints]}))

    def _dashboard_endpoints(self) -> list[dict[str, Any]]:
        return [{"name": e.id, "url": e.url, "model": ", ".join(sorted(e.models)) or None, "pool": p.name,
                 "state": "ready" if e.healthy else "down"} for p in self.pools.values() for e in p.endpoints]

    async def _list_models(self, scope: dict, send: Any) -> None:
        ident = self.keys.identify(_header(scope, b"authorization"))
        names: set[str] = set(self.models)
        for p in self.pools.values():
            names |= p.models
            names.update(p.config.lora_adapters)
        if ident.models is not None:
            names &= ident.models
        await _respond(send, 200, orjson.dumps(model_list([model_card(n, 0) for n in sorted(names)])))

    def _warn_shared_models(self) -> None:
        """A model name two pools serve, with no alias in `models:` to choose, goes to the first
        pool in config order (`_resolve`): say so once at startup, not silently."""
        for model, pools in shared_models({name: p.models for name, p in self.pools.items()}, self.models).items():
            log.warning("model %r is served by pools %s; requests for it go to pool %r (the first in the "
                        "config). Add a `models:` entry with targets to route it explicitly.",
                        model, ", ".join(pools), pools[0])

    # ---- completions ---------------------------------------------------------------------------
    def _resolve(self, model: str) -> tuple[Pool, str, str | None]:
        targets = self.models.get(model)
        if targets is not None:
            if len(targets) == 1:
                t = targets[0]
            else:
                r = self._rng.random() * sum(t.weight for t in targets)
                for t in targets:
                    r -= t.weight
                    if r < 0:
                        break
            return t.pool, t.upstream_model or model, None
        for p in self.pools.values():
            if model in p.config.lora_adapters:
                return p, model, model
            if model in p.models:
                return p, model, None
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    async def _completion(self, kind: str, scope: dict, receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid = (headers.get(b"x-request-id") or uuid.uuid4().hex.encode())
        body = await _read_body(receive, headers.get(b"content-length"), self.cfg.gateway.max_body_bytes)
        ident = self.keys.identify(headers.get(b"authorization"))
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise APIError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(req, dict):
            raise APIError(400, "Request body must be a JSON object.", code="invalid_json")
        model = req.get("model")
        scope["inferstack.model"] = model  # for the audit record of a request rejected below
        if not isinstance(model, str) or not model:
            raise APIError(404, "`model` is required: name one of GET /v1/models.", param="model",
                           code="model_not_found")
        if ident.models is not None and model not in ident.models:
            raise APIError(403, f"This API key may not use the model `{model}`.", param="model",
                           code="model_not_allowed")
        pool, upstream_model, adapter = self._resolve(model)
        priority = self.keys.priority(ident, headers.get(b"x-gateway-inference-objective"))
        tenant = self.tenants.get(ident.tenant)
        salt = tenant.salt if tenant else ident.tenant
        parts = list(prompt_parts(kind, req))
        prompt_chars = sum(len(p) for p in parts)
        if tenant is not None and (tenant.limits.rpm or tenant.limits.tpm):
            wait, which = await self.limiter.acquire(ident.tenant, tenant.limits, max(1, prompt_chars // 4))
            if wait > 0:
                self.metrics.rate_limited.labels(ident.tenant, which).inc()
                raise APIError(429, f"Rate limit reached for tenant `{ident.tenant}` ({which.upper()}).",
                               code=f"{which}_limit_exceeded",
                               headers={"retry-after": str(max(1, int(wait + 0.999)))})
        fairness = headers.get(b"x-gateway-inference-fairness-id")
        flow = self.flow[pool.name]
        try:
            waited = await flow.admit(priority, fairness.decode("latin-1") if fairness else ident.tenant,
                                      tenant.weight if tenant else 1.0)
        except APIError:
            self.metrics.shed.labels(pool.name, "shed" if priority < 0 else "queue").inc()
            raise
        if waited is not None:
            self.metrics.queue_wait.labels(pool.name).observe(waited)

        stream = req.get("stream") is True
        req["model"] = upstream_model
        req["cache_salt"] = salt
        if priority:
            req["priority"] = engine_priority(priority)
        inject_usage = False
        if stream:
            so = req.get("stream_options")
            if not (isinstance(so, dict) and so.get("include_usage")):
                inject_usage = True
                req["stream_options"] = {**so, "include_usage": True} if isinstance(so, dict) else {"include_usage": True}
        payload = orjson.dumps(req)
        rv = RequestView(
            model=upstream_model,
            prefix_hashes=text_prefix_hashes(parts, upstream_model + "\x00" + salt,
                                             self.cfg.gateway.prefix_index.block_chars,
                                             self.cfg.gateway.prefix_index.max_blocks),
            prompt_chars=prompt_chars, adapter=adapter,
            session=session_key(req, headers.get(b"x-session-id")), priority=priority,
            max_tokens=_max_tokens(req))
        if pool.config.precise_prefix is not None:
            rv.token_hashes = await self._token_hashes(pool, kind, req, salt)
        ctx = _Ctx(kind, model, pool, ident, tenant, rid, t0, stream, inject_usage, max(1, prompt_chars // 4),
                   waited is not None)
        span = None
        if self.tracer is not None:
            span = self.tracer.start_span(f"chat {model}" if kind == "chat" else f"text_completion {model}",
                                          attributes={"gen_ai.operation.name": "chat" if kind == "chat" else "text_completion",
                                                      "gen_ai.request.model": model, "inferstack.pool": pool.name,
                                                      "inferstack.tenant": ident.tenant, "inferstack.request_id": rid.decode("latin-1"),
                                                      "inferstack.priority": priority})
            ctx.span = span
        # A client disconnect cancels this task (and so the upstream request) unless the response
        # is already complete; one extra task per request instead of a wait on two.
        task = asyncio.current_task()
        watcher = asyncio.ensure_future(receive())

        def client_gone(f: asyncio.Future) -> None:
            if not ctx.responded and not f.cancelled():
                ctx.client_gone = True
                task.cancel()

        watcher.add_done_callback(client_gone)
        try:
            await self._proxy(ctx, rv, payload, send)
        except asyncio.CancelledError:
            if not ctx.client_gone:
                raise
            task.uncancel()
            ctx.status = 499
            self._count(ctx)
        finally:
            ctx.responded = True
            watcher.cancel()
            if ctx.reserved:
                flow.routed()
            if span is not None:
                span.set_attribute("http.response.status_code", ctx.status)
                span.set_attribute("inferstack.endpoint", ctx.endpoint)
                span.end()
            if self.audit is not None:
                scope["inferstack.audited"] = True
                await self._audit_done(ctx, req)

    async def _token_hashes(self, pool: Pool, kind: str, req: dict, salt: str) -> list[bytes]:
        """Tokenize through an endpoint's /tokenize (the engine applies its chat template), then hash
        blocks exactly as the engines do (DESIGN.md "KV hashing"). Failures fall back to the
        approximate index."""
        pp = pool.config.precise_prefix
        ep = next((e for e in pool.endpoints if e.healthy), None)
        if ep is None or pp is None:
            return []
        q: dict[str, Any] = {"model": req["model"]}
        if kind == "chat":
            q["messages"] = req.get("messages")
        else:
            q["prompt"] = req.get("prompt")
        try:
            async with ep.session.post("/tokenize", data=orjson.dumps(q), headers=_tokenize_headers(ep),
                                       timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                if r.status != 200:
                    return []
                tokens = orjson.loads(await r.read()).get("tokens") or []
        except (*_RETRYABLE, orjson.JSONDecodeError, AttributeError):
            return []
        space = KVKeySpace(pp.model_digest, pp.dtype, pp.kv_layout, pp.block_size)
        return space.hashes(tokens, salt)

    async def _proxy(self, ctx: _Ctx, rv: RequestView, payload: bytes, send: Any) -> None:
        pool = ctx.pool
        cfg = self.cfg.gateway
        tried: set[str] = set()
        path = b"/v1/chat/completions" if ctx.kind == "chat" else b"/v1/completions"
        last_error = "no endpoint"
        for attempt in range(cfg.max_retries + 1):
            result = pool.router.route(rv, pool.snapshot(frozenset(tried)) if tried else pool.snapshot())
            if result is None:
                break
            ep = pool.by_id(result.endpoint.id)
            tried.add(ep.id)
            self.metrics.decision(pool.name, result.profile, result.reason)
            ctx.endpoint = ep.id
            ep.in_flight += 1
            if ctx.reserved:
                ctx.reserved = False
                self.flow[pool.name].routed()
            try:
                leg_payload = payload
                if isinstance(result, PDResult):  # prefill/decode disaggregation: run the prefill leg first
                    leg_payload = await self.pd.decode_payload(pool, result, path, payload, ctx.rid)
                outcome = await self._attempt(ctx, ep, path, leg_payload, send, last=attempt == cfg.max_retries)
            finally:
                ep.in_flight -= 1
                self.flow[pool.name].pump()
            if outcome is None:
                ep.request_succeeded()
                if ctx.ttft is not None:
                    pool.router.state.latency.observe(ep.id, rv.est_prompt_tokens, ep.in_flight + 1,
                                                      ctx.ttft, ctx.tpot)
                return
            # retryable failure before any byte reached the client
            ep.request_failed(cfg)
            last_error = outcome
            log.warning("request %s to %s failed (%s), %s", ctx.rid.decode("latin-1"), ep.id, outcome,
                        "retrying" if attempt < cfg.max_retries else "giving up")
            if attempt < cfg.max_retries:
                self.metrics.retries.labels(pool.name, ep.id, outcome.split(":")[0]).inc()
        ctx.status = 503 if last_error == "no endpoint" else 502
        self._count(ctx)
        msg = (f"No healthy endpoint in pool `{pool.name}`." if last_error == "no endpoint"
               else f"Every endpoint tried failed (last: {last_error}).")
        await _error(send, APIError(ctx.status, msg, code="upstream_unavailable", headers={"retry-after": "1"}),
                     ctx.rid)

    async def _attempt(self, ctx: _Ctx, ep: Endpoint, path: bytes, payload: bytes, send: Any,
                       last: bool) -> str | None:
        """One upstream try. Returns None when the client got a response, or a reason to retry."""
        headers = [*ep.request_headers, (b"x-request-id", ctx.rid)]
        if ctx.stream:
            return await self._attempt_stream(ctx, ep, path, payload, send, headers, last)
        try:
            status, ctype, data = await self._fetch(ep, path, payload, headers)
        except _RETRYABLE as exc:
            return f"connection: {type(exc).__name__}"
        if status >= 500 and not last:
            return f"status {status}"
        ctx.status = status
        # A non-streamed response arrives whole: its first token's time is unknown, so it feeds
        # E2E only (observing E2E as TTFT would also make TPOT read ~0).
        now = time.perf_counter()
        usage = None
        if status == 200:
            i = data.rfind(b'"usage"')
            if i >= 0:
                try:
                    usage = orjson.loads(data).get("usage")
                except (orjson.JSONDecodeError, AttributeError):
                    usage = None
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(data)).encode()),
                                (b"x-request-id", ctx.rid), (_SERVED, ep.id.encode())]})
        await send({"type": "http.response.body", "body": data})
        ctx.responded = True
        await self._finish(ctx, now, usage, chunks=1)
        return None

    async def _fetch(self, ep: Endpoint, path: bytes, payload: bytes, headers: list) -> tuple[int, bytes, bytes]:
        conn = await ep.upstream.request(b"POST", path, headers, payload)
        try:
            data = await conn.read()
        except BaseException:
            conn.close()
            raise
        status, ctype = conn.status, conn.content_type
        conn.release()
        return status, ctype, data

    async def _attempt_stream(self, ctx: _Ctx, ep: Endpoint, path: bytes, payload: bytes, send: Any,
                              headers: list, last: bool) -> str | None:
        try:
            conn = await ep.upstream.request(b"POST", path, headers, payload)
        except OSError as exc:
            return f"connection: {type(exc).__name__}"
        try:
            if conn.status != 200:
                if conn.status >= 500 and not last:
                    conn.close()
                    return f"status {conn.status}"
                try:
                    data = await conn.read()
                except OSError as exc:
                    conn.close()
                    return f"connection: {type(exc).__name__}"
                ctx.status = conn.status
                await send({"type": "http.response.start", "status": conn.status,
                            "headers": [(b"content-type", conn.content_type), (b"x-request-id", ctx.rid),
                                        (_SERVED, ep.id.encode())]})
                await send({"type": "http.response.body", "body": data})
                ctx.responded = True
                self._count(ctx)
                conn.release()
                return None
            ctx.status = 200
            await send({"type": "http.response.start", "status": 200,
                        "headers": [_SSE, (b"cache-control", b"no-cache"), (b"x-request-id", ctx.rid),
                                    (_SERVED, ep.id.encode())]})
            first_at = last_at = 0.0
            gaps: list[float] = []
            events = 0
            usage = None
            try:
                while (chunk := await conn.next_chunk()) is not None:
                    now = time.perf_counter()
                    if b'"usage":{' in chunk or b'"usage": {' in chunk:
                        chunk, u = _take_usage(chunk, strip=ctx.inject_usage)
                        usage = u or usage
                        if not chunk:
                            continue
                    if first_at == 0.0:
                        if b'"content":""' not in chunk:
                            first_at = now
                            ctx.ttft = now - ctx.t0
                    else:
                        gaps.append(now - last_at)
                    last_at = now
                    events += chunk.count(b"data:")
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except OSError as exc:
                # never retry once streaming began: tell the client, end the stream cleanly
                conn.close()
                ctx.status = 502
                err = APIError(502, f"The upstream endpoint failed mid-stream ({exc}).", code="upstream_error")
                await send({"type": "http.response.body", "body": sse_raw(err.body()) + SSE_DONE, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            ctx.responded = True
            conn.release()
            ctx.gaps = gaps
            await self._finish(ctx, last_at or time.perf_counter(), usage, chunks=max(1, events - 1))
            return None
        except BaseException:
            conn.close()  # cancelled (client gone) or failed: drop the upstream connection
            raise

    async def _finish(self, ctx: _Ctx, end: float, usage: Any, chunks: int) -> None:
        pool = ctx.pool
        tname = ctx.ident.tenant
        labels = (ctx.model, pool.name, ctx.endpoint, tname)
        ttft_h, tpot_h, e2e_h, itl_h = self.metrics.latency_children(labels)
        e2e = end - ctx.t0
        e2e_h.observe(e2e)
        out_tokens = chunks
        in_tokens = 0
        if isinstance(usage, dict):
            out_tokens = int(usage.get("completion_tokens") or 0)
            in_tokens = int(usage.get("prompt_tokens") or 0)
            self.metrics.tokens.labels(ctx.model, pool.name, tname, "input").inc(in_tokens)
            self.metrics.tokens.labels(ctx.model, pool.name, tname, "output").inc(out_tokens)
        if ctx.ttft is not None:
            ttft_h.observe(ctx.ttft)
            if out_tokens > 1:
                ctx.tpot = (e2e - ctx.ttft) / (out_tokens - 1)
                tpot_h.observe(ctx.tpot)
        for g in ctx.gaps:
            itl_h.observe(g)
        self._count(ctx)
        if ctx.span is not None:
            ctx.span.set_attribute("gen_ai.usage.input_tokens", in_tokens)
            ctx.span.set_attribute("gen_ai.usage.output_tokens", out_tokens)
        ctx.in_tokens, ctx.out_tokens = in_tokens, out_tokens
        if ctx.tenant is not None and ctx.tenant.limits.tpm and isinstance(usage, dict):
            await self.limiter.settle(tname, ctx.tenant.limits, in_tokens + out_tokens - ctx.est_tokens)

    def _count(self, ctx: _Ctx) -> None:
        self.metrics.request_done(ctx.model, ctx.pool.name, ctx.endpoint, ctx.ident.tenant, ctx.status)

    # ---- audit (docs/compliance.md): one record per completion request, queued off the event loop ----
    async def _audit_done(self, ctx: _Ctx, req: dict) -> None:
        assert self.audit is not None
        pool = ctx.pool.config
        digest = pool.model_digest or (f"sha256:{pool.precise_prefix.model_digest}" if pool.precise_prefix else None)
        prompt = "\n".join(prompt_parts(ctx.kind, req))  # hashed on the writer thread; text kept only if enabled
        await self.audit.append(AuditRecord(
            model=ctx.model, status=ctx.status, latency_ms=round((time.perf_counter() - ctx.t0) * 1000, 3),
            tenant=ctx.ident.tenant, key_id=ctx.ident.key_id, request_id=ctx.rid.decode("latin-1"),
            model_digest=digest, endpoint=ctx.endpoint or None, prompt_tokens=ctx.in_tokens,
            completion_tokens=ctx.out_tokens, prompt=prompt))

    async def _audit_rejected(self, scope: dict, exc: APIError, t0: float) -> None:
        assert self.audit is not None
        headers = dict(scope["headers"])
        try:
            ident: Identity | None = self.keys.identify(headers.get(b"authorization"))
        except APIError:
            ident = None
        model = scope.get("inferstack.model")
        rid = headers.get(b"x-request-id")
        await self.audit.append(AuditRecord(
            model=model if isinstance(model, str) else None, status=exc.status,
            latency_ms=round((time.perf_counter() - t0) * 1000, 3), tenant=ident.tenant if ident else None,
            key_id=ident.key_id if ident else None, request_id=rid.decode("latin-1") if rid else None,
            error=exc.code or exc.message))


def gateway_openapi() -> dict[str, Any]:
    """The engine's OpenAPI document (official OpenAI schemas) with the gateway's paths and statuses."""
    doc = engine_openapi(title="inferstack gateway")
    paths = doc["paths"]
    for p in ("/tokenize", "/detokenize"):
        paths.pop(p, None)
    err = paths["/v1/models"]["get"]["responses"]["401"]
    for p in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[p]["post"]["responses"]
        for status in ("400", "401", "403", "404", "413", "429", "502", "503"):
            responses.setdefault(status, err)
    paths["/ready"]["get"]["summary"] = "Readiness: 200 while some endpoint is healthy"
    paths["/metrics"]["get"]["summary"] = "Prometheus metrics (OTel GenAI names)"
    return doc


class _Ctx:
    __slots__ = ("client_gone", "endpoint", "est_tokens", "gaps", "ident", "in_tokens", "inject_usage", "kind", "model",
                 "out_tokens", "pool", "reserved", "responded", "rid", "span", "status", "stream", "t0", "tenant", "tpot",
                 "ttft")

    def __init__(self, kind: str, model: str, pool: Pool, ident: Identity, tenant: _Tenant | None, rid: bytes,
                 t0: float, stream: bool, inject_usage: bool, est_tokens: int, reserved: bool):
        self.kind, self.model, self.pool, self.ident, self.tenant = kind, model, pool, ident, tenant
        self.rid, self.t0, self.stream, self.inject_usage = rid, t0, stream, inject_usage
        self.est_tokens, self.reserved = est_tokens, reserved
        self.endpoint = ""
        self.status = 0
        self.ttft: float | None = None
        self.tpot: float | None = None
        self.gaps: list[float] = []
        self.span: Any = None
        self.responded = False
        self.client_gone = False
        self.in_tokens: int | None = None
        self.out_tokens: int | None = None


def _take_usage(chunk: bytes, strip: bool) -> tuple[bytes, dict | None]:
    """Find the usage-only event (``"choices":[]``) in a chunk; drop it if the gateway asked for it."""
    usage = None
    kept = []
    for ev in chunk.split(b"\n\n"):
        if b'"usage"' in ev and ev.startswith(b"data:"):
            try:
                obj = orjson.loads(ev[5:])
            except orjson.JSONDecodeError:
                kept.append(ev)
                continue
            u = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(u, dict):
                usage = u
                if strip and not obj.get("choices"):
                    continue
        kept.append(ev)
    return b"\n\n".join(kept), usage


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _max_tokens(req: dict) -> int:
    v = req.get("max_completion_tokens", req.get("max_tokens"))
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 64


def _header(scope: dict, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def _tokenize_headers(ep: Endpoint) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if ep.api_key:
        h["authorization"] = f"Bearer {ep.api_key}"
    return h


async def _read_body(receive: Any, content_length: bytes | None, limit: int) -> bytes:
    if content_length is not None:
        try:
            if int(content_length) > limit:
                raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
        except ValueError:
            raise APIError(400, "Invalid Content-Length header.") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise APIError(499, "Client disconnected.")
        b = msg.get("body", b"")
        size += len(b)
        if size > limit:
            raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
        chunks.append(b)
        if not msg.get("more_body"):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(send: Any, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*(headers or _JSON), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Any, exc: APIError, rid: bytes | None = None) -> None:
    headers = [*_JSON, *((k.encode(), v.encode()) for k, v in exc.headers.items())]
    if rid:
        headers.append((b"x-request-id", rid))
    await _respond(send, exc.status, exc.body(), headers)


def shared_models(pool_models: dict[str, set[str]], aliases: Collection[str]) -> dict[str, list[str]]:
    """Model names (not aliases) that more than one pool serves -> those pools, in config order."""
    owners: dict[str, list[str]] = {}
    for pool, models in pool_models.items():
        for model in models:
            owners.setdefault(model, []).append(pool)
    return {m: pools for m, pools in sorted(owners.items()) if len(pools) > 1 and m not in aliases}
