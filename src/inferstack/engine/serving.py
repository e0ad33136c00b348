"""OpenAI requests on the engine, without HTTP: validate a request against the served model, turn
it into token ids and SamplingParams, run it (one engine request per prompt, aborted however the
consumer stops), and assemble OpenAI responses or stream chunks from the engine's deltas.

``engine/server.py`` puts this behind HTTP; raising ``protocol.errors.APIError`` is how this module
tells it which status and envelope a bad request gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from inferstack.engine.outputs import GRAMMAR_FAILED, FinishReason, RequestOutput
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.structured.requests import requested_grammar
from inferstack.engine.structured.spec import GrammarSpec
from inferstack.engine.tools.formats import ToolFormat
from inferstack.engine.tools.parse import ToolCallStreamer, parse_tool_calls
from inferstack.engine.tools.plan import ToolPlan, plan_tools, template_messages
from inferstack.protocol import responses as R
from inferstack.protocol.errors import APIError, bad_request, internal_error, not_supported
from inferstack.protocol.requests import ChatCompletionRequest, ChatMessage, CompletionRequest
from inferstack.protocol.sse import SSE_DONE, sse_event
from inferstack.protocol.strict_schema import StrictLimits
from inferstack.telemetry.engine_metrics import RequestObserver
from inferstack.telemetry.logs import request_id_var

log = logging.getLogger("inferstack.engine.serving")

MAX_N = 128                      # choices per request; more is almost surely a mistake
_THREAD_TOKENIZE_CHARS = 16_384  # longer texts are tokenized off the event loop

T = TypeVar("T")
TokenText = Callable[[int], str]


class TokenizerLike(Protocol):
    """What serving needs from the engine's tokenizer (``engine.tokenizer.Tokenizer``)."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def id_to_token(self, token_id: int) -> str: ...
    def special_token_id(self, text: str) -> int | None: ...
    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> list[int]: ...


class EngineLike(Protocol):
    """What serving needs from ``AsyncEngine`` (unit tests may pass a fake at their edge)."""

    model_name: str
    tokenizer: TokenizerLike
    max_model_len: int
    tool_format: ToolFormat
    strict_limits: StrictLimits

    @property
    def error(self) -> BaseException | None:
        """Why the engine stopped, or None while it runs (``/health`` says so)."""

    def stats(self) -> Any: ...
    def metric_collectors(self) -> list[Any]:
        """Prometheus collectors the server adds to its /metrics registry (KV tiers, PD transfers)."""
    def ready_info(self) -> dict[str, Any]:
        """Extra keys of the ready file (KV events endpoint, KV transfer address and key space)."""
    async def shutdown(self) -> None: ...
    async def compile_grammar(self, spec: GrammarSpec, param: str) -> None: ...
    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 priority: int = 0, cache_salt: str | None = None,
                 **kv_transfer: Any) -> AsyncGenerator[RequestOutput, None]: ...
    async def abort(self, request_id: str) -> None: ...


class TokenTexts:
    """Text of single tokens for logprobs, cached (the vocabulary is small; logprobs are per token)."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    want_logprobs: bool
    priority: int
    cache_salt: str | None
    kv_transfer_params: dict[str, Any] | None = None
    tools: ToolPlan | None = None            # tool calls to parse out of the output


async def prepare_chat(engine: EngineLike, req: ChatCompletionRequest) -> Prepared:
    check_model(engine, req.model)
    _chat_unsupported(req)
    tools, tool_choice = _tools_of(req)
    fmt = engine.tool_format
    marker = engine.tokenizer.special_token_id(fmt.start) if fmt.start else None
    plan = plan_tools(fmt, tools, tool_choice, req.parallel_tool_calls, engine.strict_limits, marker)
    messages = chat_messages(req.messages)
    native = "tools" in (engine.tokenizer.chat_template or "")
    messages = template_messages(engine.tool_format, plan, messages, native)
    add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt
    extra = {"tools": tools} if native and plan is not None else {}
    prompt_ids = await encode_chat(engine, messages, add_gen, **extra)
    grammar, param = requested_grammar(req, engine.strict_limits)
    if plan is not None and plan.grammar is not None:
        grammar, param = plan.grammar, "tools"
    if grammar is not None:
        await engine.compile_grammar(grammar, param)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if requested is not None and requested < 1:
        raise bad_request(f"max_tokens must be at least 1, got {requested}", "max_tokens")
    max_tokens = _resolve_max_tokens(engine, len(prompt_ids), requested, "messages")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    params = _sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, grammar)
    if plan is not None:
        params = replace(params, keep_special_ids=plan.keep_special_ids)
    return Prepared([prompt_ids], params, bool(req.stream), _include_usage(req), bool(req.logprobs),
                    req.priority or 0, req.cache_salt, req.kv_transfer_params, plan)


def _tools_of(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None]:
    """``tools``/``tool_choice``, or the deprecated ``functions``/``function_call`` in their place."""
    if req.functions and not req.tools:
        choice = req.function_call
        named = {"type": "function", "function": choice} if isinstance(choice, dict) else choice
        return [{"type": "function", "function": f} for f in req.functions], named
    return req.tools, req.tool_choice


async def prepare_completion(engine: EngineLike, req: CompletionRequest) -> Prepared:
    check_model(engine, req.model)
    if req.echo:
        raise not_supported("echo", "echo")
    if req.suffix:
        raise not_supported("suffix", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise not_supported("best_of other than n", "best_of")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
    prompts = await completion_prompts(engine, req.prompt)
    max_tokens = min(_resolve_max_tokens(engine, len(p), req.max_tokens, "prompt") for p in prompts)
    grammar, param = requested_grammar(req, engine.strict_limits)
    if grammar is not None:
        await engine.compile_grammar(grammar, param)
    params = _sampling_params(req, max_tokens, req.logprobs, grammar)
    return Prepared(prompts, params, bool(req.stream), _include_usage(req), req.logprobs is not None,
                    req.priority or 0, req.cache_salt, req.kv_transfer_params)


def _include_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# --- request -> engine inputs ----------------------------------------------------------------------

def check_model(engine: EngineLike, model: str | None) -> None:
    if model is not None and model != engine.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.model_name}'.",
                       param="model", code="model_not_found")


def _chat_unsupported(req: ChatCompletionRequest) -> None:
    if req.audio is not None or (req.modalities and any(m != "text" for m in req.modalities)):
        raise not_supported("audio output", "modalities")
    if req.prediction is not None:
        raise not_supported("prediction (predicted outputs)", "prediction")


def _message_text(i: int, msg: ChatMessage) -> str:
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


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [_chat_message(i, m) for i, m in enumerate(messages)]


def _chat_message(i: int, m: ChatMessage) -> dict[str, Any]:
    role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
    out: dict[str, Any] = {"role": role, "content": _message_text(i, m)}
    if role == "tool":
        if m.tool_call_id is None and m.role == "tool":
            raise bad_request(f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                              f"messages[{i}].tool_call_id")
        out["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            out["name"] = m.name
    if m.tool_calls:
        if role != "assistant":
            raise bad_request(f"messages[{i}]: only assistant messages may have tool_calls",
                              f"messages[{i}].tool_calls")
        for j, call in enumerate(m.tool_calls):
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(f"Missing required parameter: 'messages[{i}].tool_calls[{j}].function.name'.",
                                  f"messages[{i}].tool_calls[{j}].function.name")
        out["tool_calls"] = m.tool_calls
    return out


async def encode_chat(engine: EngineLike, messages: list[dict[str, Any]], add_generation_prompt: bool,
                      add_special_tokens: bool = False, **template_kwargs: Any) -> list[int]:
    """Render and tokenize a chat; message text never becomes a control token (Tokenizer.encode_chat).
    ``template_kwargs`` reach the chat template (``tools`` for templates that render them)."""
    size = sum(len(m.get("content") or "") for m in messages)
    try:
        if size > _THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(engine.tokenizer.encode_chat, messages, add_generation_prompt,
                                           add_special_tokens, **template_kwargs)
        return engine.tokenizer.encode_chat(messages, add_generation_prompt, add_special_tokens, **template_kwargs)
    except ValueError as exc:  # ChatTemplateError: the template refused these messages (the client's input)
        raise bad_request(f"The chat template rejected these messages: {exc}", "messages") from exc


async def encode(engine: EngineLike, text: str, add_special_tokens: bool = False) -> list[int]:
    if len(text) > _THREAD_TOKENIZE_CHARS:
        return await asyncio.to_thread(engine.tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_token_ids(engine: EngineLike, ids: list[int], param: str) -> None:
    size = engine.tokenizer.vocab_size
    if ids and max(ids) >= size:
        raise bad_request(f"{param}: token id {max(ids)} is outside the vocabulary (size {size})", param)


def _resolve_max_tokens(engine: EngineLike, prompt_len: int, requested: int | None, what: str) -> int:
    limit = engine.max_model_len
    if prompt_len == 0:
        raise bad_request(f"The {what} is empty; give at least one token.", what)
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens, and the {what} alone is "
                            f"{prompt_len} tokens, which leaves no room for the completion. Please shorten the {what}.",
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
                     logprobs: int | None, grammar: GrammarSpec | None = None) -> SamplingParams:
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
        structured_outputs=grammar,
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
    kv_transfer_params: dict[str, Any] | None = None   # PD: in, where to pull KV; out (prefill), where it is held
    tools: ToolPlan | None = None                      # parse tool calls out of the output
    _open: set[tuple[int, int]] = field(default_factory=set)

    def engine_request_id(self, p: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{p}"

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        n = self.params.n
        self._open = {(p, i) for p in range(len(self.prompts)) for i in range(n)}
        try:
            async with contextlib.aclosing(self._merged()) as merged:
                async for p, out in merged:
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

    def _stream(self, p: int) -> AsyncGenerator[RequestOutput, None]:
        if self.kv_transfer_params is None:
            return self.engine.generate(self.prompts[p], self.params, self.engine_request_id(p),
                                        priority=self.priority, cache_salt=self.cache_salt)
        return self.engine.generate(self.prompts[p], self.params, self.engine_request_id(p),
                                    priority=self.priority, cache_salt=self.cache_salt,
                                    kv_transfer_params=self.kv_transfer_params)

    async def _merged(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        if len(self.prompts) == 1:
            async with contextlib.aclosing(self._stream(0)) as stream:
                async for out in stream:
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
    if isinstance(out.stop_reason, str) and out.stop_reason.startswith(GRAMMAR_FAILED):
        raise APIError(400, "The request's grammar (response_format, tools or guided_*) failed while generating: "
                       f"{out.stop_reason.removeprefix(GRAMMAR_FAILED)}. Simplify the schema.",
                       param="response_format", code="grammar_failed")
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

def _chat_logprobs(token_text: TokenText, out: RequestOutput) -> list[dict[str, Any]]:
    if not out.logprobs:
        return []
    tt = token_text
    return [R.chat_logprob_entry(tt(lp.token_id), lp.logprob, [(tt(t), v) for t, v in lp.top])
            for lp in out.logprobs]


def _completion_logprobs(token_text: TokenText, out: RequestOutput, offset: int) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    tt = token_text
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


# --- assembling responses -------------------------------------------------------------------------

async def chat_full(gen: Generation, token_text: TokenText, response_id: str, created: int, model: str,
                     want_logprobs: bool) -> dict[str, Any]:
    choices = [_Choice() for _ in range(gen.params.n)]
    totals = _Totals()
    transfer: dict[str, Any] | None = None
    async for index, out in gen.outputs():
        c = choices[index]
        c.text.append(out.new_text)
        if want_logprobs:
            c.logprobs.extend(_chat_logprobs(token_text, out))
        totals.add(index, out)
        if out.finished:
            c.finish = _finish_reason(out)
            transfer = out.kv_transfer_params or transfer
    return _with_transfer(R.chat_completion(
        response_id, created, model,
        [_chat_choice(gen.tools, i, c, R.chat_logprobs(c.logprobs) if want_logprobs else None)
         for i, c in enumerate(choices)],
        totals.usage()), transfer)


def _chat_choice(tools: ToolPlan | None, index: int, c: _Choice, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    text, finish = "".join(c.text), c.finish or "stop"
    if tools is None:
        return R.chat_choice(index, text, finish, logprobs)
    content, calls = parse_tool_calls(tools.fmt, text)
    return R.chat_choice(index, content, tools.finish_reason(bool(calls), finish), logprobs,
                         [call.to_openai() for call in calls])


def _with_transfer(body: dict[str, Any], transfer: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's PD contract: a prefill engine's response says where the request's KV is held."""
    if transfer is not None:
        body["kv_transfer_params"] = transfer
    return body

async def chat_stream(gen: Generation, token_text: TokenText, response_id: str, created: int, model: str,
                       include_usage: bool, want_logprobs: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        return sse_event(R.chat_chunk(response_id, created, model, choices, usage, include_usage))

    totals = _Totals()
    try:
        parts = (_tool_stream(gen, totals, token_text, want_logprobs) if gen.tools is not None
                 else _content_stream(gen, totals, token_text, want_logprobs))
        async for part in parts:
            yield chunk([part])
        if include_usage:
            yield chunk([], totals.usage())
    except APIError as err:
        yield sse_event(err.envelope())
    except Exception:
        log.exception("stream %s failed", response_id)
        yield sse_event(internal_error(request_id_var.get()).envelope())
    yield SSE_DONE


async def _content_stream(gen: Generation, totals: _Totals, token_text: TokenText,
                          want_logprobs: bool) -> AsyncIterator[dict[str, Any]]:
    for i in range(gen.params.n):
        yield R.chat_chunk_choice(i, {"role": "assistant", "content": ""})
    async for index, out in gen.outputs():
        totals.add(index, out)
        finish = _finish_reason(out) if out.finished else None
        if not out.new_text and finish is None and not out.logprobs:
            continue
        lps = R.chat_logprobs(_chat_logprobs(token_text, out)) if want_logprobs else None
        delta = {"content": out.new_text} if out.new_text or finish is None else {}
        yield R.chat_chunk_choice(index, delta, finish, lps)


async def _tool_stream(gen: Generation, totals: _Totals, token_text: TokenText,
                       want_logprobs: bool) -> AsyncIterator[dict[str, Any]]:
    """Chat chunk choices when tools may be called: content as it comes (minus what may open a call),
    then per call one delta with id and name and deltas with ``arguments`` pieces, as OpenAI streams.
    Logprobs of tokens whose text is held back ride on the choice's next chunk, so the stream carries
    every token's logprob once, as the non-streamed response does."""
    plan = gen.tools
    assert plan is not None
    streamers = [ToolCallStreamer(plan.fmt) for _ in range(gen.params.n)]
    started: set[int] = set()
    pending: list[list[dict[str, Any]]] = [[] for _ in range(gen.params.n)]

    def opening(index: int, delta: dict[str, Any]) -> dict[str, Any]:
        if index in started:
            return delta
        started.add(index)
        return {"role": "assistant", "content": None, **delta} if "tool_calls" in delta else delta

    async for index, out in gen.outputs():
        totals.add(index, out)
        if want_logprobs:
            pending[index] += _chat_logprobs(token_text, out)
        streamer = streamers[index]
        content, calls = streamer.feed(out.new_text)
        if out.finished:
            content += streamer.finish()
        parts: list[tuple[dict[str, Any], str | None]] = []
        if content:
            if index not in started:
                started.add(index)
                parts.append(({"role": "assistant", "content": ""}, None))
            parts.append(({"content": content}, None))
        parts += [(opening(index, {"tool_calls": [call]}), None) for call in calls]
        if out.finished:
            finish = plan.finish_reason(streamer.has_calls, _finish_reason(out))
            parts.append((opening(index, {}) if index in started else {"role": "assistant", "content": ""}, finish))
        for k, (delta, finish_reason) in enumerate(parts):
            lps = None
            if want_logprobs and k == len(parts) - 1:
                lps, pending[index] = R.chat_logprobs(pending[index]), []
            yield R.chat_chunk_choice(index, delta, finish_reason, lps)


async def completion_prompts(engine: EngineLike, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await encode(engine, prompt)]
    if not prompt:
        raise bad_request("prompt must not be an empty list", "prompt")
    if isinstance(prompt[0], int):
        check_token_ids(engine, prompt, "prompt")
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [await encode(engine, p) for p in prompt]
    for i, ids in enumerate(prompt):
        check_token_ids(engine, ids, f"prompt[{i}]")
    return [list(ids) for ids in prompt]

async def completion_full(gen: Generation, token_text: TokenText, response_id: str, created: int,
                           model: str) -> dict[str, Any]:
    n_choices = len(gen.prompts) * gen.params.n
    choices = [_Choice() for _ in range(n_choices)]
    offsets = [0] * n_choices
    totals = _Totals()
    transfer: dict[str, Any] | None = None
    async for index, out in gen.outputs():
        c = choices[index]
        if gen.params.logprobs is not None:
            part = _completion_logprobs(token_text, out, offsets[index])
            if part is not None:
                c.logprobs.append(part)
        c.text.append(out.new_text)
        offsets[index] += len(out.new_text)
        totals.add(index, out)
        if out.finished:
            c.finish = _finish_reason(out)
            transfer = out.kv_transfer_params or transfer
    return _with_transfer(R.completion(
        response_id, created, model,
        [R.completion_choice(i, "".join(c.text), c.finish or "stop",
                             _merge_completion_logprobs(c.logprobs) if gen.params.logprobs is not None else None)
         for i, c in enumerate(choices)],
        totals.usage()), transfer)

async def completion_stream(gen: Generation, token_text: TokenText, response_id: str, created: int, model: str,
                             include_usage: bool) -> AsyncIterator[bytes]:
    totals = _Totals()
    offsets = [0] * (len(gen.prompts) * gen.params.n)
    try:
        async for index, out in gen.outputs():
            totals.add(index, out)
            finish = _finish_reason(out) if out.finished else None
            if not out.new_text and finish is None:
                continue
            lps = (_completion_logprobs(token_text, out, offsets[index])
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
