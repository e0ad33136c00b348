"""The gateway's ASGI application: OpenAI-compatible front over engine pools.

Raw ASGI (no framework on the hot path): the HTTP layer reads the body once and hands it to the
request pipeline (`gateway/pipeline/`: authenticate, parse, resolve, admit, plan), then to the
pipeline's proxy stage, which picks endpoints and relays the response; accounting closes it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from functools import partial
from types import MappingProxyType
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from inferstack.config.schema import InferstackConfig
from inferstack.gateway.admin import AdminAPI, admin_token
from inferstack.gateway.kvreuse import DirectReads
from inferstack.gateway.limits import Limiter
from inferstack.gateway.metricsmerge import WorkerPeers, local_scrape
from inferstack.gateway.pd import PDLegs
from inferstack.gateway.pipeline import Inbound, Pipeline, RequestContext
from inferstack.gateway.pipeline.context import KINDS
from inferstack.gateway.pipeline.hold import ClientGone
from inferstack.gateway.pipeline.proxy import AsgiResponder, Proxy, Responder, respond, send_error
from inferstack.gateway.pipeline.resolve import shared_models
from inferstack.protocol.errors import APIError
from inferstack.protocol.http_cycle import Cycle
from inferstack.protocol.http_guard import BODY_NOW, CLIENT_GONE, body_at_hand, read_asgi_body
from inferstack.protocol.openapi import engine_openapi
from inferstack.protocol.responses import model_card, model_list
from inferstack.telemetry.dashboard import dashboard_asgi, scraping_state_provider

log = logging.getLogger("inferstack.gateway")
_NO_EXTENSIONS = MappingProxyType({})

__all__ = ["Gateway", "gateway_openapi", "shared_models"]


class Gateway:
    """ASGI app over a `Pipeline`. ``tracer_provider`` (OpenTelemetry) is optional."""

    def __init__(self, cfg: InferstackConfig, tracer_provider: Any = None, limiter: Limiter | None = None,
                 peers: WorkerPeers | None = None):
        self.cfg = cfg
        self.peers = peers  # the other worker processes of this gateway (gateway/workers.py), if any
        self.pipeline = Pipeline(cfg, tracer_provider, limiter)
        p = self.pipeline
        self.pools, self.metrics, self.flow, self.datalayer = p.pools, p.metrics, p.flow, p.datalayer
        pd = PDLegs(p.metrics.registry, cfg.gateway)
        self.proxy = Proxy(cfg.gateway, p.picker, p.account, pd, p.metrics, DirectReads(p.metrics.registry))
        self._openapi = orjson.dumps(gateway_openapi())
        gw = cfg.gateway
        enabled = gw.admin_api if gw.admin_api is not None else _is_loopback(gw.host)
        self._body_timeout_s = gw.http.body_timeout_s
        # the completion paths our HTTP front serves without ASGI (`FrontProtocol.direct`): every request that
        # costs CPU per token goes there; the rest (admin, metrics, models, errors) is ASGI
        self.direct_post = {path: partial(self._direct, kind) for path, kind in KINDS.items()}
        self.admin = AdminAPI(self.pools, self.datalayer, admin_token(gw, enabled), p)
        self._dashboard = dashboard_asgi("/dashboard", scraping_state_provider(
            lambda: generate_latest(self.metrics.registry).decode(), self._dashboard_endpoints))

    # ---- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """The HTTP routes (in this coroutine, not one more per request: every await in a request's task passes
        through each coroutine above it), or the lifespan."""
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        path = scope["raw_path"].split(b"?", 1)[0] if scope.get("raw_path") else scope["path"].encode()
        method = scope["method"]
        kind = KINDS.get(path)
        try:
            if kind is not None:
                await self._completion(kind, method, scope, receive, send)
            elif path == b"/health":
                await respond(send, 200, b'{"status":"ok"}')
            elif path == b"/ready":
                why = self.pipeline.not_ready_reason()
                await respond(send, 503 if why else 200,
                              orjson.dumps({"status": why}) if why else b'{"status":"ready"}')
            elif path == b"/metrics":
                await self._metrics(scope, send)
            elif path == b"/v1/models":
                await self._list_models(scope, send)
            elif path == b"/openapi.json":
                await respond(send, 200, self._openapi)
            elif path.startswith(b"/admin/pools"):
                await self._admin(path, method, scope, receive, send)
            elif path == b"/dashboard" or path.startswith(b"/dashboard/"):
                await self._dashboard(scope, receive, send)
            else:
                raise APIError(404, f"Unknown path {path.decode('latin-1')}.", code="not_found")
        except APIError as exc:
            await send_error(send, exc)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.pipeline.open()
                except Exception as exc:  # report startup failures through the lifespan protocol
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self._warn_shared_models()
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.pipeline.aclose()
                if self.peers is not None:
                    await self.peers.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _metrics(self, scope: dict, send: Any) -> None:
        """This process's metrics; with workers, the whole gateway's (one worker's own over its Unix socket)."""
        text = generate_latest(self.metrics.registry)
        if self.peers is not None and not local_scrape(scope):
            try:
                text = await self.peers.gateway_metrics(text)
            except (OSError, TimeoutError) as exc:
                raise APIError(503, f"Metrics incomplete: {exc}", code="metrics_unavailable") from None
        await respond(send, 200, text, [(b"content-type", CONTENT_TYPE_LATEST.encode())])

    async def _admin(self, path: bytes, method: str, scope: dict, receive: Any, send: Any) -> None:
        """GET /admin/pools: pools and endpoint state. PUT /admin/pools/{pool}/endpoints with
        {"endpoints": [{"url", "name"?}, ...]}: replace a pool's endpoints (desired state)."""
        headers = dict(scope["headers"])

        async def read_body(limit: int) -> bytes:
            return await _read_body(receive, headers.get(b"content-length"), limit, self._body_timeout_s)

        query = scope.get("query_string", b"")
        await respond(send, 200, await self.admin.handle(path, method, headers, read_body, query))

    def _dashboard_endpoints(self) -> list[dict[str, Any]]:
        return [{"name": e.id, "url": e.url, "model": ", ".join(sorted(e.models)) or None, "pool": p.name,
                 "state": "ready" if e.healthy else "down"} for p in self.pools.values() for e in p.endpoints]

    async def _list_models(self, scope: dict, send: Any) -> None:
        ident = self.pipeline.keys.identify(_header(scope, b"authorization"))
        names = self.pipeline.resolver.model_names()
        if ident.models is not None:
            names &= ident.models
        await respond(send, 200, orjson.dumps(model_list([model_card(n, 0) for n in sorted(names)])))

    def _warn_shared_models(self) -> None:
        """A model name two pools serve, with no alias in `models:` to choose, goes to the first
        pool in config order (`Resolver.resolve`): say so once at startup, not silently."""
        owners = {name: p.models for name, p in self.pools.items()}
        for model, pools in shared_models(owners, self.pipeline.resolver.aliases).items():
            log.warning("model %r is served by pools %s; requests for it go to pool %r (the first in the "
                        "config). Add a `models:` entry with targets to route it explicitly.",
                        model, ", ".join(pools), pools[0])

    # ---- completions: the pipeline, then the proxy stage -----------------------------------------
    async def _direct(self, kind: str, cycle: Cycle) -> None:
        """A completion POST from our HTTP front without ASGI (`direct_post`): no scope, no message dicts; the
        same request, checks and answers as through `__call__`."""
        try:
            await self._complete(kind, "POST", cycle.headers, cycle.gone, cycle.body_now, cycle.receive, cycle.send,
                                 cycle)
        except APIError as exc:
            await send_error(cycle.send, exc)

    async def _completion(self, kind: str, method: str, scope: dict, receive: Any, send: Any) -> None:
        extensions = scope.get("extensions", _NO_EXTENSIONS)
        await self._complete(kind, method, scope["headers"], extensions.get(CLIENT_GONE), extensions.get(BODY_NOW),
                             receive, send, AsgiResponder(send))

    async def _complete(self, kind: str, method: str, headers: list[tuple[bytes, bytes]], gone: asyncio.Future | None,
                        body_now: Callable[[], bytes | None] | None, receive: Any, send: Any, out: Responder) -> None:
        inbound = Inbound.arrive(kind, dict(headers), self.pipeline.request_ids)
        # ``gone`` completes when the client goes away: ends a hold (scale from zero) or cancels the proxy. Our
        # server protocol hands every request one (http_guard.CLIENT_GONE); under another ASGI server a
        # task waits in `receive` for the disconnect, as the one reader of `receive` once the body is in
        # this task, found through the future's loop: `asyncio.current_task()` alone is a getpid system call
        task = asyncio.current_task(gone.get_loop()) if gone is not None else asyncio.current_task()
        try:
            if method != "POST":
                raise APIError(405, f"Use POST for {inbound.path.decode()}.")
            limit, length = self.cfg.gateway.max_body_bytes, inbound.headers.get(b"content-length")
            _check_length(length, limit)
            # nearly every body came with its headers: taken with no coroutine (`body_at_hand`)
            body = body_at_hand(body_now, limit) if body_now is not None else None
            if body is None:
                body = await read_asgi_body(receive, limit, self._body_timeout_s, task)
        except APIError as exc:
            await self.pipeline.account.rejected(inbound, None, None, exc)
            raise
        watcher = gone or asyncio.ensure_future(receive())
        try:
            ctx = await self.pipeline.start(inbound, body, client_gone=watcher)
        except ClientGone:
            return  # nobody to answer; counted and audited as 499 by the pipeline
        except BaseException:
            watcher.cancel()
            raise
        try:
            await self._serve(ctx, watcher, send, out, task)
        finally:
            ctx.outcome.responded = True
            await self.pipeline.close(ctx)

    async def _serve(self, ctx: RequestContext, watcher: asyncio.Future, send: Any, out: Responder,
                     task: asyncio.Task) -> None:
        """Proxy in ``task`` (the current one), cancelled if the client disconnects (``watcher`` completes)
        before its response is complete; no extra task per request, no wait on two."""
        gone = False

        def client_gone(f: asyncio.Future) -> None:
            nonlocal gone
            if not ctx.outcome.responded and not f.cancelled():
                gone = True
                task.cancel()

        watcher.add_done_callback(client_gone)
        try:
            await self.proxy.serve(ctx, send, out)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
            ctx.outcome.status = 499
            self.pipeline.account.count(ctx)
        finally:
            watcher.remove_done_callback(client_gone)
            watcher.cancel()


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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _header(scope: dict, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


async def _read_body(receive: Any, content_length: bytes | None, limit: int, timeout_s: float,
                     task: asyncio.Task | None = None, body_now: Callable[[], bytes | None] | None = None) -> bytes:
    """The whole body: 413 past ``limit`` bytes, 408 when it takes longer than ``timeout_s`` (a
    client trickling its body must not hold a request slot for ever)."""
    _check_length(content_length, limit)
    return await read_asgi_body(receive, limit, timeout_s, task, body_now)


def _check_length(content_length: bytes | None, limit: int) -> None:
    """413 for a declared length past ``limit`` before reading any of the body; 400 for a malformed one."""
    if content_length is not None:
        try:
            if int(content_length) > limit:
                raise APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
        except ValueError:
            raise APIError(400, "Invalid Content-Length header.") from None
