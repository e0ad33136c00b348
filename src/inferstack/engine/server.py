"""The engine's HTTP layer: OpenAI-compatible API, vLLM utility endpoints, health and /metrics.

A thin layer over ``AsyncEngine``: it parses and validates requests (``inferstack.protocol``), turns
them into token ids and SamplingParams, streams ``engine.generate`` deltas back as OpenAI responses or
SSE chunks, and aborts the engine request as soon as the client goes away so its KV blocks are freed.
The engine core never sees HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferstack.engine.connector.nixl_agent import NixlUnavailable
from inferstack.engine.serving import (
    EngineLike,
    Generation,
    Prepared,
    TokenTexts,
    chat_full,
    chat_messages,
    chat_stream,
    check_model,
    check_token_ids,
    completion_full,
    completion_stream,
    encode,
    encode_chat,
    prepare_chat,
    prepare_completion,
)
from inferstack.fileio import write_ready_file
from inferstack.protocol import responses as R
from inferstack.protocol.errors import APIError, bad_request, error_from_exception, internal_error
from inferstack.protocol.http_guard import guarded_protocol, read_body_within
from inferstack.protocol.http_limits import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, KEEP_ALIVE_S, MAX_HEADER_BYTES
from inferstack.protocol.ids import clean_request_id
from inferstack.protocol.openapi import engine_openapi
from inferstack.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from inferstack.telemetry.engine_metrics import EngineMetrics
from inferstack.telemetry.logs import request_id_var

log = logging.getLogger("inferstack.engine.server")

_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class ServerState:
    """Everything the app reads per request; one per app (no module-level state)."""

    api_key: str | None = None
    engine: EngineLike | None = None
    draining: bool = False
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    token_texts: TokenTexts | None = None
    body_timeout_s: float = BODY_TIMEOUT_S

    def attach(self, engine: EngineLike) -> None:
        self.engine = engine
        self.token_texts = TokenTexts(engine.tokenizer)
        self.metrics.bind(engine.model_name, engine.stats)
        for collector in engine.metric_collectors():
            self.metrics.add_live(collector)

    def ready_engine(self) -> EngineLike:
        if self.engine is None:
            raise APIError(503, "The model is still loading; retry when /ready returns 200.", code="model_not_ready",
                           headers={"Retry-After": "5"})
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        return self.engine


# --- ASGI plumbing ---------------------------------------------------------------------------------

class ClientGone(Exception):
    """The client disconnected before the response was complete."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


T = TypeVar("T")


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client disconnects first; then cancel it (its cleanup aborts the engine
    request) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:        # we were cancelled (e.g. shutdown past the drain timeout): take work along
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone


class GuardedStream(Response):
    """An SSE response that stops (and closes its body generator, aborting the engine request) the moment
    the client disconnects, instead of generating into the void."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        self.body_iter = body
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def pump() -> None:
            async for chunk in self.body_iter:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnect(receive, pump())
        except ClientGone:
            log.info("client disconnected mid-stream; request aborted")
        finally:
            await self.body_iter.aclose()  # type: ignore[attr-defined]


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(err: APIError) -> Response:
    return Response(err.body(), status_code=err.status, media_type="application/json", headers=err.headers)


class RequestContext:
    """Pure ASGI middleware: request id in and out, API key, access log, and the last-resort error
    envelope (no input ever reaches the client as a traceback or a bare 500 page)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = clean_request_id(_header(scope, b"x-request-id")) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            auth_error = self._check_auth(scope)
            if auth_error is not None:
                await error_response(auth_error)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error serving %s %s", scope["method"], scope["path"])
            if status == 0:
                await error_response(internal_error(rid))(scope, receive, send_with_id)
        finally:
            # probes and scrapes arrive every few seconds: keep them out of the INFO log
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS and status < 400 else logging.INFO
            log.log(level, "%s %s %d %.1fms", scope["method"], scope["path"], status,
                    (time.perf_counter() - started) * 1e3)
            request_id_var.reset(token)

    def _check_auth(self, scope: Scope) -> APIError | None:
        key = self.state.api_key
        if not key or not scope["path"].startswith(_PROTECTED_PREFIXES):
            return None
        header = _header(scope, b"authorization") or ""
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            given = _header(scope, b"x-api-key") or ""
        if given and hmac.compare_digest(given.strip().encode(), key.encode()):
            return None
        msg = "Missing API key: send 'Authorization: Bearer <key>'." if not given else "Incorrect API key provided."
        return APIError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


_QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


# --- endpoints -------------------------------------------------------------------------------------

MAX_BODY_BYTES = 32 << 20     # far above any prompt a context window holds; stops memory-exhausting bodies


async def read_body(request: Request, limit: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed ``limit`` (before reading it all);
    a 408 when it does not arrive within ``timeout_s`` (a stalled upload must not hold a slot)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {declared} bytes; the limit is {limit}.", code="body_too_large")
    return await read_body_within(request.stream(), limit, timeout_s)


class Handlers:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._openapi = orjson.dumps(engine_openapi())

    async def _body(self, request: Request) -> bytes:
        return await read_body(request, timeout_s=self.state.body_timeout_s)

    def _start(self, request: Request, engine: EngineLike, prepared: Prepared) -> tuple[Generation, str]:
        rid = f"{request.scope['state']['request_id']}-{uuid.uuid4().hex[:8]}"
        return Generation(engine, prepared.prompts, prepared.params, rid, self.state.metrics.observer(),
                          priority=prepared.priority, cache_salt=prepared.cache_salt,
                          kv_transfer_params=prepared.kv_transfer_params, tools=prepared.tools), rid

    async def chat_completions(self, request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await self._body(request))
        engine = self.state.ready_engine()
        prepared = await prepare_chat(engine, req)
        gen, rid = self._start(request, engine, prepared)
        args = (gen, self.state.token_texts, f"chatcmpl-{rid}", int(time.time()), engine.model_name)
        if prepared.stream:
            return GuardedStream(chat_stream(*args, prepared.include_usage, prepared.want_logprobs))
        return json_response(await until_disconnect(request.receive, chat_full(*args, prepared.want_logprobs)))

    async def completions(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await self._body(request))
        engine = self.state.ready_engine()
        prepared = await prepare_completion(engine, req)
        gen, rid = self._start(request, engine, prepared)
        args = (gen, self.state.token_texts, f"cmpl-{rid}", int(time.time()), engine.model_name)
        if prepared.stream:
            return GuardedStream(completion_stream(*args, prepared.include_usage))
        return json_response(await until_disconnect(request.receive, completion_full(*args)))

    # utilities -------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        engine = self.state.ready_engine()
        card = R.model_card(engine.model_name, self.state.created, root=engine.model_name,
                            max_model_len=engine.max_model_len)
        return json_response(R.model_list([card]))

    async def tokenize(self, request: Request) -> Response:
        req = parse_request(TokenizeRequest, await self._body(request))
        engine = self.state.ready_engine()
        check_model(engine, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Give exactly one of 'prompt' or 'messages'", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise bad_request("messages must not be empty", "messages")
            add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt
            ids = await encode_chat(engine, chat_messages(req.messages), add_gen, bool(req.add_special_tokens))
        else:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await encode(engine, req.prompt or "", special)
        strs = [engine.tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None
        return json_response({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                              "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        req = parse_request(DetokenizeRequest, await self._body(request))
        engine = self.state.ready_engine()
        check_model(engine, req.model)
        check_token_ids(engine, req.tokens, "tokens")
        return json_response({"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)})

    async def health(self, request: Request) -> Response:
        engine = self.state.engine
        error = engine.error if engine is not None else None
        if error is not None:
            return json_response({"status": "dead", "error": str(error)}, status=503)
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        self.state.ready_engine()
        return json_response({"status": "ready", "model": self.state.engine.model_name})  # type: ignore[union-attr]

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.state.metrics.render()
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json")


def _wrap(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Turn every client-facing exception into its OpenAI envelope."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientGone:
            log.info("client disconnected before the response; request aborted")
            return Response(status_code=499)
        except Exception as exc:
            err = error_from_exception(exc)
            if err is None:
                log.exception("internal error serving %s", request.url.path)
                return error_response(internal_error(request.scope["state"].get("request_id")))
            if err.status >= 500:
                log.warning("%s: %s", request.url.path, err.message)
            return error_response(err)

    return endpoint


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: f"No route {request.url.path}", 405: f"Method {request.method} not allowed on {request.url.path}"}
    return error_response(APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                                   code="not_found" if exc.status_code == 404 else None))


def build_app(state: ServerState) -> ASGIApp:
    """The engine's ASGI app; attach the engine with ``state.attach(engine)`` once it is loaded."""
    h = Handlers(state)
    routes = [
        Route("/v1/chat/completions", _wrap(h.chat_completions), methods=["POST"]),
        Route("/v1/completions", _wrap(h.completions), methods=["POST"]),
        Route("/v1/models", _wrap(h.models), methods=["GET"]),
        Route("/tokenize", _wrap(h.tokenize), methods=["POST"]),
        Route("/detokenize", _wrap(h.detokenize), methods=["POST"]),
        Route("/health", _wrap(h.health), methods=["GET"]),
        Route("/ready", _wrap(h.ready), methods=["GET"]),
        Route("/metrics", _wrap(h.metrics), methods=["GET"]),
        Route("/openapi.json", _wrap(h.openapi), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    return RequestContext(app, state)


# --- process: bind, load, serve, drain -------------------------------------------------------------

@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    ready_file: str | None = None
    api_key: str | None = None
    drain_timeout: float = 30.0
    max_header_bytes: int = MAX_HEADER_BYTES    # request line + headers; 431 above (docs/security.md)
    header_timeout_s: float = HEADER_TIMEOUT_S  # 408 when the header block is not complete by then
    body_timeout_s: float = BODY_TIMEOUT_S      # 408 when the body is not complete by then


class _DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT marking the app as draining (/ready -> 503, new generation requests
    refused) while in-flight requests finish; and a clean exit status instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            log.info("signal %d: draining in-flight requests (up to %.0fs), then exiting", sig,
                     self.config.timeout_graceful_shutdown or 0)
        self.state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield       # embedded (tests): the host owns signals
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def server_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _load_in_thread(factory: Callable[[], EngineLike]) -> asyncio.Future[EngineLike]:
    """Load the model on a daemon thread, so a signal during a long load can still end the process."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[EngineLike] = loop.create_future()

    def settle(result: EngineLike | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            engine = factory()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, engine, None)

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return fut


async def serve(factory: Callable[[], EngineLike], options: ServeOptions, *,
                stop: asyncio.Event | None = None, on_listening: Callable[[str], None] | None = None,
                freeze_heap: bool = False) -> int:
    """Bind, answer /health at once, load the engine (``factory``, blocking, on a thread), announce
    readiness, serve until SIGTERM (or ``stop`` is set), drain, shut the engine down.

    ``on_listening(url)`` is called once the socket is bound, before the model loads. ``freeze_heap`` (a
    server process, never a host embedding it): `gc.freeze()` once loaded, so neither the full collections
    while serving nor the one at exit walk the engine's objects again (exiting took a real engine ~0.9 and
    an emulated fleet ~0.4 CPU-s of that walk; 0.3 and 0.06 frozen). Returns the exit status."""
    sock = _bind(options.host, options.port)
    url = server_url(options.host, sock.getsockname()[1])
    state = ServerState(api_key=options.api_key, body_timeout_s=options.body_timeout_s)
    protocol = guarded_protocol(options.max_header_bytes, options.header_timeout_s)
    config = uvicorn.Config(build_app(state), loop="none", http=protocol, lifespan="off", log_config=None,
                            access_log=False, timeout_graceful_shutdown=options.drain_timeout,
                            timeout_keep_alive=KEEP_ALIVE_S, server_header=False)
    server = _DrainingServer(config, state)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    if stop is not None:
        async def stop_when_set() -> None:
            await stop.wait()
            server.handle_exit(signal.SIGTERM, None)

        stopper = asyncio.ensure_future(stop_when_set())
        serving.add_done_callback(lambda _: stopper.cancel())
    log.info("listening on %s; loading the model", url)
    if on_listening is not None:
        on_listening(url)
    loading = _load_in_thread(factory)
    await asyncio.wait({serving, loading}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():        # stopped before the model finished loading
        await serving
        return 0
    if loading.exception() is not None:
        exc = loading.exception()
        expected = isinstance(exc, ValueError | FileNotFoundError | NixlUnavailable)   # the message says it all
        what = "start the KV transport" if isinstance(exc, NixlUnavailable) else "load the model"
        log.error("could not %s: %s", what, exc, exc_info=None if expected else exc)
        server.should_exit = True
        await serving
        return 1
    engine = loading.result()
    state.attach(engine)
    if freeze_heap:   # the loaded engine lives until the process exits: no collection needs to walk it again
        gc.freeze()
    if not server.should_exit:
        log.info("model %s ready (max_model_len %d)", engine.model_name, engine.max_model_len)
        write_ready_file(options.ready_file, {"urls": [url], "pid": os.getpid(), **engine.ready_info()})
    await serving
    await engine.shutdown()
    log.info("stopped")
    return 0


def run(factory: Callable[[], EngineLike], options: ServeOptions) -> int:
    """Run ``serve`` on uvloop (falls back to asyncio's loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(factory, options, freeze_heap=True))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(factory, options, freeze_heap=True))
