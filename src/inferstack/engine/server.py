"""The engine's HTTP layer: OpenAI-compatible API, vLLM utility endpoints, health and /metrics.

A thin layer over ``AsyncEngine``: it parses and validates requests (``inferstack.protocol``), turns
them into token ids and SamplingParams, streams ``engine.generate`` deltas back as OpenAI responses or
SSE chunks, and aborts the engine request as soon as the client goes away so its KV blocks are freed.
The engine core never sees HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferstack.engine.outputs import FinishReason, RequestOutput
from inferstack.engine.sampling_params import SamplingParams
from inferstack.protocol import responses as R
from inferstack.protocol.errors import (
    APIError,
    bad_request,
    error_from_exception,
    internal_error,
    not_supported,
)
from inferstack.protocol.openapi import engine_openapi
from inferstack.protocol.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from inferstack.protocol.sse import SSE_DONE, sse_event
from inferstack.telemetry.engine_metrics import EngineMetrics, RequestObserver
from inferstack.telemetry.logs import request_id_var

log = logging.getLogger("inferstack.engine.server")

MAX_N = 128                      # choices per request; more is almost surely a mistake
_THREAD_TOKENIZE_CHARS = 16_384  # longer texts are tokenized off the event loop
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class EngineLike(Protocol):
    """What the server needs from ``AsyncEngine`` (tests may pass a fake at their edge)."""

    model_name: str
    tokenizer: Any
    max_model_len: int

    def stats(self) -> Any: ...
    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 priority: int = 0, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]: ...
    async def abort(self, request_id: str) -> None: ...


@dataclass
class ServerState:
    """Everything the app reads per request; one per app (no module-level state)."""

    api_key: str | None = None
    engine: EngineLike | None = None
    draining: bool = False
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    _token_text: dict[int, str] = field(default_factory=dict)

    def attach(self, engine: EngineLike) -> None:
        self.engine = engine
        self.metrics.bind(engine.model_name, engine.stats)

    def ready_engine(self) -> EngineLike:
        if self.engine is None:
            raise APIError(503, "The model is still loading; retry when /ready returns 200.", code="model_not_ready",
                           headers={"Retry-After": "5"})
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        return self.engine

    def token_text(self, token_id: int) -> str:
        """Text of one token for logprobs (cached: the vocabulary is small and this is per token)."""
        text = self._token_text.get(token_id)
        if text is None:
            assert self.engine is not None
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text


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
        rid = _clean_request_id(_header(scope, b"x-request-id")) or uuid.uuid4().hex
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
_REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:/=+@-]")


def _clean_request_id(value: str | None) -> str | None:
    """A client's id, kept printable and short: it ends up in engine ids, response ids and logs."""
    if not value:
        return None
    return _REQUEST_ID_UNSAFE.sub("_", value[:128]) or None


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


# --- request -> engine inputs ----------------------------------------------------------------------

_NOT_YET = "not supported yet"


def _check_model(engine: EngineLike, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.model_name}'.",
                       param="model", code="model_not_found")


def _chat_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise not_supported("tools (function calling)", "tools")
    if req.functions:
        raise not_supported("functions (function calling)", "functions")
    if isinstance(req.tool_choice, dict) or req.tool_choice == "required":
        raise not_supported("tool_choice", "tool_choice")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise not_supported(f"response_format type '{req.response_format.get('type')}' (structured output)",
                            "response_format")
    if req.audio is not None or (req.modalities and any(m != "text" for m in req.modalities)):
        raise not_supported("audio output", "modalities")
    if req.prediction is not None:
        raise not_supported("prediction (predicted outputs)", "prediction")


def _message_text(i: int, msg: ChatMessage) -> str:
    if msg.role in ("tool", "function") or msg.tool_calls:
        raise not_supported(f"'{msg.role}' messages and tool calls", f"messages[{i}]")
    content = msg.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        text = part.get("text") if kind == "text" else part.get("refusal") if kind == "refusal" else None
        if kind in ("text", "refusal"):
            if not isinstance(text, str):
                raise bad_request(f"messages[{i}].content[{j}].{kind} must be a string",
                                  f"messages[{i}].content[{j}].{kind}")
            parts.append(text)
        else:
            raise not_supported(f"content part type '{kind}' (only text is accepted)", f"messages[{i}].content[{j}]")
    return "".join(parts)


def _chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(i, m)}
            for i, m in enumerate(messages)]


def _apply_template(engine: EngineLike, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as exc:   # templates raise on role orders they refuse; that is the client's input
        raise bad_request(f"The chat template rejected these messages: {exc}", "messages") from exc


async def _encode(engine: EngineLike, text: str, add_special_tokens: bool = False) -> list[int]:
    if len(text) > _THREAD_TOKENIZE_CHARS:
        return await asyncio.to_thread(engine.tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _vocab_size(engine: EngineLike) -> int | None:
    size = getattr(engine.tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _check_token_ids(engine: EngineLike, ids: list[int], param: str) -> None:
    size = _vocab_size(engine)
    if size is not None and ids and max(ids) >= size:
        raise bad_request(f"{param}: token id {max(ids)} is outside the vocabulary (size {size})", param)


def _resolve_max_tokens(engine: EngineLike, prompt_len: int, requested: int | None, what: str) -> int:
    limit = engine.max_model_len
    if prompt_len == 0:
        raise bad_request(f"The {what} is empty; give at least one token.", what)
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} has "
                            f"{prompt_len} tokens, which leaves no room for the completion. Please shorten it.",
                       param=what, code="context_length_exceeded")
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
                            f"completion). Please reduce the length of the {what} or max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return requested


def _sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int,
                     logprobs: int | None) -> SamplingParams:
    n = 1 if req.n is None else req.n
    if n > MAX_N:
        raise bad_request(f"n must be at most {MAX_N}, got {n}", "n")
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    if req.logit_bias:
        raise not_supported("logit_bias", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    def pick(value: T | None, default: T) -> T:
        return default if value is None else value

    return SamplingParams(
        n=n,
        temperature=pick(req.temperature, 1.0),
        top_p=pick(req.top_p, 1.0),
        top_k=pick(req.top_k, -1),
        min_p=pick(req.min_p, 0.0),
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
        presence_penalty=pick(req.presence_penalty, 0.0),
        frequency_penalty=pick(req.frequency_penalty, 0.0),
        repetition_penalty=pick(req.repetition_penalty, 1.0),
        logprobs=logprobs,
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=pick(req.skip_special_tokens, True),
    )


# --- running requests on the engine ----------------------------------------------------------------

@dataclass
class Generation:
    """One client request on the engine: one engine request per prompt, each with ``n`` choices.

    Iterating ``outputs()`` yields (choice index, output); however it ends (done, error, cancelled
    because the client left), every engine request not finished yet is aborted.
    """

    engine: EngineLike
    prompts: list[list[int]]
    params: SamplingParams
    request_id: str
    observer: RequestObserver
    priority: int = 0
    cache_salt: str | None = None
    _open: set[tuple[int, int]] = field(default_factory=set)

    def engine_request_id(self, p: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{p}"

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        n = self.params.n
        self._open = {(p, i) for p in range(len(self.prompts)) for i in range(n)}
        try:
            async for p, out in self._merged():
                if out.finished:
                    self._open.discard((p, out.index))
                self.observer.on_output(out.index + p * n, len(out.new_token_ids), out.metrics,
                                        out.finish_reason.value if out.finish_reason else None)
                yield p * n + out.index, out
        finally:
            if self._open:
                await asyncio.shield(self._abort_open())

    async def _abort_open(self) -> None:
        for p in sorted({p for p, _ in self._open}):
            try:
                await self.engine.abort(self.engine_request_id(p))
            except Exception:
                log.exception("aborting %s failed", self.engine_request_id(p))

    def _stream(self, p: int) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(self.prompts[p], self.params, self.engine_request_id(p),
                                    priority=self.priority, cache_salt=self.cache_salt)

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self.prompts) == 1:
            async for out in self._stream(0):
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(p: int) -> None:
            try:
                async for out in self._stream(p):
                    queue.put_nowait((p, out))
            except Exception as exc:
                queue.put_nowait((p, exc))
            finally:
                queue.put_nowait((p, None))

        tasks = [asyncio.ensure_future(pump(p)) for p in range(len(self.prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                p, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield p, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _finish_reason(out: RequestOutput) -> str:
    reason = out.finish_reason
    if reason in (FinishReason.STOP, FinishReason.LENGTH):
        return reason.value
    if reason == FinishReason.ABORT:
        raise APIError(503, "The request was aborted by the engine (shutting down or preempted for good).",
                       code="request_aborted")
    raise APIError(500, "The engine failed while generating this request; the server logged the details.",
                   code="engine_error")


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish: str | None = None
    output_tokens: int = 0


class _Totals:
    """Token usage of one client request: per engine request (prompt) and per choice."""

    __slots__ = ("cached", "completion", "prompt")

    def __init__(self) -> None:
        self.prompt: dict[str, int] = {}
        self.cached: dict[str, int] = {}
        self.completion: dict[int, int] = {}

    def add(self, index: int, out: RequestOutput) -> None:
        self.prompt[out.request_id] = out.num_prompt_tokens
        self.cached[out.request_id] = max(self.cached.get(out.request_id, 0), out.num_cached_tokens)
        self.completion[index] = out.num_output_tokens

    def usage(self) -> dict[str, Any]:
        return R.usage(sum(self.prompt.values()), sum(self.completion.values()), sum(self.cached.values()))


# --- logprob formatting ----------------------------------------------------------------------------

def _chat_logprobs(state: ServerState, out: RequestOutput) -> list[dict[str, Any]]:
    if not out.logprobs:
        return []
    tt = state.token_text
    return [R.chat_logprob_entry(tt(lp.token_id), lp.logprob, [(tt(t), v) for t, v in lp.top])
            for lp in out.logprobs]


def _completion_logprobs(state: ServerState, out: RequestOutput, offset: int) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    tt = state.token_text
    tokens, values, tops, offsets = [], [], [], []
    for lp in out.logprobs:
        text = tt(lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({tt(t): v for t, v in lp.top} if lp.top else {text: lp.logprob})
        offsets.append(offset)
        offset += len(text)
    return R.completion_logprobs(tokens, values, tops, offsets)


def _merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in merged:
            merged[key].extend(part[key])
    return merged


# --- endpoints -------------------------------------------------------------------------------------

def _request_id(request: Request) -> str:
    return f"{request.scope['state']['request_id']}-{uuid.uuid4().hex[:8]}"


async def _body(request: Request) -> bytes:
    return await request.body()


class Handlers:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._openapi = orjson.dumps(engine_openapi())

    # chat ------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await _body(request))
        engine = self.state.ready_engine()
        _check_model(engine, req.model)
        _chat_unsupported(req)
        messages = _chat_messages(req.messages)
        add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt
        prompt_ids = await _encode(engine, _apply_template(engine, messages, add_gen))
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if requested is not None and requested < 1:
            raise bad_request(f"max_tokens must be at least 1, got {requested}", "max_tokens")
        max_tokens = _resolve_max_tokens(engine, len(prompt_ids), requested, "messages")
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        params = _sampling_params(req, max_tokens, (top or 0) if req.logprobs else None)
        rid = _request_id(request)
        gen = Generation(engine, [prompt_ids], params, rid, self.state.metrics.observer(),
                         priority=req.priority or 0, cache_salt=req.cache_salt)
        created = int(time.time())
        response_id = f"chatcmpl-{rid}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return GuardedStream(self._chat_stream(gen, response_id, created, engine.model_name,
                                                   include_usage, bool(req.logprobs)))
        body = await until_disconnect(request.receive, self._chat_full(gen, response_id, created,
                                                                         engine.model_name, bool(req.logprobs)))
        return json_response(body)

    async def _chat_full(self, gen: Generation, response_id: str, created: int, model: str,
                         want_logprobs: bool) -> dict[str, Any]:
        choices = [_Choice() for _ in range(gen.params.n)]
        totals = _Totals()
        async for index, out in gen.outputs():
            c = choices[index]
            c.text.append(out.new_text)
            if want_logprobs:
                c.logprobs.extend(_chat_logprobs(self.state, out))
            totals.add(index, out)
            if out.finished:
                c.finish = _finish_reason(out)
        return R.chat_completion(
            response_id, created, model,
            [R.chat_choice(i, "".join(c.text), c.finish or "stop",
                           R.chat_logprobs(c.logprobs) if want_logprobs else None) for i, c in enumerate(choices)],
            totals.usage())

    async def _chat_stream(self, gen: Generation, response_id: str, created: int, model: str,
                           include_usage: bool, want_logprobs: bool) -> AsyncIterator[bytes]:
        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            return sse_event(R.chat_chunk(response_id, created, model, choices, usage, include_usage))

        totals = _Totals()
        try:
            for i in range(gen.params.n):
                yield chunk([R.chat_chunk_choice(i, {"role": "assistant", "content": ""})])
            async for index, out in gen.outputs():
                totals.add(index, out)
                finish = _finish_reason(out) if out.finished else None
                if not out.new_text and finish is None and not out.logprobs:
                    continue
                lps = R.chat_logprobs(_chat_logprobs(self.state, out)) if want_logprobs else None
                delta = {"content": out.new_text} if out.new_text or finish is None else {}
                yield chunk([R.chat_chunk_choice(index, delta, finish, lps)])
            if include_usage:
                yield chunk([], totals.usage())
        except APIError as err:
            yield sse_event(err.envelope())
        except Exception:
            log.exception("stream %s failed", response_id)
            yield sse_event(internal_error(request_id_var.get()).envelope())
        yield SSE_DONE

    # completions -----------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await _body(request))
        engine = self.state.ready_engine()
        _check_model(engine, req.model)
        if req.echo:
            raise not_supported("echo", "echo")
        if req.suffix:
            raise not_supported("suffix", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise not_supported("best_of other than n", "best_of")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
        prompts = await self._prompts(engine, req.prompt)
        max_tokens = min(_resolve_max_tokens(engine, len(p), req.max_tokens, "prompt") for p in prompts)
        params = _sampling_params(req, max_tokens, req.logprobs)
        rid = _request_id(request)
        gen = Generation(engine, prompts, params, rid, self.state.metrics.observer(),
                         priority=req.priority or 0, cache_salt=req.cache_salt)
        created = int(time.time())
        response_id = f"cmpl-{rid}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return GuardedStream(self._completion_stream(gen, response_id, created, engine.model_name,
                                                         include_usage))
        body = await until_disconnect(request.receive,
                                      self._completion_full(gen, response_id, created, engine.model_name))
        return json_response(body)

    async def _prompts(self, engine: EngineLike, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [await _encode(engine, prompt)]
        if not prompt:
            raise bad_request("prompt must not be an empty list", "prompt")
        if isinstance(prompt[0], int):
            _check_token_ids(engine, prompt, "prompt")
            return [list(prompt)]
        if isinstance(prompt[0], str):
            return [await _encode(engine, p) for p in prompt]
        for i, ids in enumerate(prompt):
            _check_token_ids(engine, ids, f"prompt[{i}]")
        return [list(ids) for ids in prompt]

    async def _completion_full(self, gen: Generation, response_id: str, created: int,
                               model: str) -> dict[str, Any]:
        n_choices = len(gen.prompts) * gen.params.n
        choices = [_Choice() for _ in range(n_choices)]
        offsets = [0] * n_choices
        totals = _Totals()
        async for index, out in gen.outputs():
            c = choices[index]
            if gen.params.logprobs is not None:
                part = _completion_logprobs(self.state, out, offsets[index])
                if part is not None:
                    c.logprobs.append(part)
            c.text.append(out.new_text)
            offsets[index] += len(out.new_text)
            totals.add(index, out)
            if out.finished:
                c.finish = _finish_reason(out)
        return R.completion(
            response_id, created, model,
            [R.completion_choice(i, "".join(c.text), c.finish or "stop",
                                 _merge_completion_logprobs(c.logprobs) if gen.params.logprobs is not None else None)
             for i, c in enumerate(choices)],
            totals.usage())

    async def _completion_stream(self, gen: Generation, response_id: str, created: int, model: str,
                                 include_usage: bool) -> AsyncIterator[bytes]:
        totals = _Totals()
        offsets = [0] * (len(gen.prompts) * gen.params.n)
        try:
            async for index, out in gen.outputs():
                totals.add(index, out)
                finish = _finish_reason(out) if out.finished else None
                if not out.new_text and finish is None:
                    continue
                lps = (_completion_logprobs(self.state, out, offsets[index])
                       if gen.params.logprobs is not None else None)
                offsets[index] += len(out.new_text)
                yield sse_event(R.completion(response_id, created, model,
                                             [R.completion_choice(index, out.new_text, finish, lps)]))
            if include_usage:
                yield sse_event(R.completion(response_id, created, model, [], totals.usage()))
        except APIError as err:
            yield sse_event(err.envelope())
        except Exception:
            log.exception("stream %s failed", response_id)
            yield sse_event(internal_error(request_id_var.get()).envelope())
        yield SSE_DONE

    # utilities -------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        engine = self.state.ready_engine()
        card = R.model_card(engine.model_name, self.state.created, root=engine.model_name,
                            max_model_len=engine.max_model_len)
        return json_response(R.model_list([card]))

    async def tokenize(self, request: Request) -> Response:
        req = parse_request(TokenizeRequest, await _body(request))
        engine = self.state.ready_engine()
        _check_model(engine, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Give exactly one of 'prompt' or 'messages'", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise bad_request("messages must not be empty", "messages")
            add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt
            text = _apply_template(engine, _chat_messages(req.messages), add_gen)
            ids = await _encode(engine, text, bool(req.add_special_tokens))
        else:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await _encode(engine, req.prompt or "", special)
        strs = [engine.tokenizer.id_to_token(i) for i in ids] if req.return_token_strs else None
        return json_response({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                              "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        req = parse_request(DetokenizeRequest, await _body(request))
        engine = self.state.ready_engine()
        _check_model(engine, req.model)
        _check_token_ids(engine, req.tokens, "tokens")
        return json_response({"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)})

    async def health(self, request: Request) -> Response:
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


def write_ready_file(path: str | None, urls: list[str]) -> None:
    """Print the ready line and write it atomically (watchers never read half a line)."""
    line = orjson.dumps({"urls": urls, "pid": os.getpid()}).decode()
    print(line, flush=True)
    if path:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, path)


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
                stop: asyncio.Event | None = None, on_listening: Callable[[str], None] | None = None) -> int:
    """Bind, answer /health at once, load the engine (``factory``, blocking, on a thread), announce
    readiness, serve until SIGTERM (or ``stop`` is set), drain, shut the engine down.

    ``on_listening(url)`` is called once the socket is bound, before the model loads. Returns the exit
    status."""
    sock = _bind(options.host, options.port)
    url = server_url(options.host, sock.getsockname()[1])
    state = ServerState(api_key=options.api_key)
    config = uvicorn.Config(build_app(state), loop="none", http="httptools", lifespan="off", log_config=None,
                            access_log=False, timeout_graceful_shutdown=options.drain_timeout,
                            server_header=False)
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
        log.error("could not load the model: %s", exc, exc_info=not isinstance(exc, ValueError | FileNotFoundError))
        server.should_exit = True
        await serving
        return 1
    engine = loading.result()
    state.attach(engine)
    if not server.should_exit:
        log.info("model %s ready (max_model_len %d)", engine.model_name, engine.max_model_len)
        write_ready_file(options.ready_file, [url])
    await serving
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        await shutdown()
    log.info("stopped")
    return 0


def run(factory: Callable[[], EngineLike], options: ServeOptions) -> int:
    """Run ``serve`` on uvloop (falls back to asyncio's loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(factory, options))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(factory, options))
