"""HTTP side of the bench: request bodies, one shared aiohttp pool, and timestamped responses.

The hot path does as little as possible: bodies are built before the run starts, a streamed response
is read line by line recording only (time, bytes), and the lines are parsed once the request is done.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from inferstack.bench.http import HTTPClient, HTTPFailure
from inferstack.bench.records import RequestRecord
from inferstack.bench.workloads import RequestSpec


class BenchError(RuntimeError):
    """A problem the user must fix (unreachable target, bad option); printed without a traceback."""


def base_url(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BenchError(f"target {url!r} must start with http:// or https://")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class ClientOptions:
    endpoint: str = "chat"                  # chat | completions
    stream: bool = True
    ignore_eos: bool = True                 # make the server produce exactly max_tokens (vLLM extension)
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    stall_timeout_s: float = 120.0          # no byte for this long: the request is reported as stalled
    api_key: str | None = None
    max_connections: int = 0                # 0: no cap on the pool
    extra_body: dict[str, object] = field(default_factory=dict)


def build_body(spec: RequestSpec, model: str, opts: ClientOptions) -> bytes:
    body: dict[str, object] = {"model": model, "max_tokens": spec.output_tokens, "temperature": opts.temperature}
    if opts.endpoint == "chat":
        body["messages"] = [{"role": role, "content": text} for role, text in spec.messages]
    else:
        body["prompt"] = "\n".join(text for _, text in spec.messages)
    if opts.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra_body)
    return orjson.dumps(body)


def _error_message(raw: bytes) -> str:
    try:
        err = orjson.loads(raw).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err:
            return str(err)
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return raw[:300].decode(errors="replace")


def _apply_usage(rec: RequestRecord, usage: dict | None) -> bool:
    if not isinstance(usage, dict) or usage.get("completion_tokens") is None:
        return False
    rec.output_tokens = int(usage["completion_tokens"])
    if usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = int(usage["prompt_tokens"])
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        rec.cached_tokens = int(details["cached_tokens"])
    return True


def parse_stream(rec: RequestRecord, lines: list[tuple[float, bytes]], clock0: float) -> None:
    """Content chunk times and token counts from SSE lines (usage chunk first, else chunk count)."""
    have_usage = False
    for t, line in lines:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            rec.status, rec.error = "bad_response", f"unparseable SSE data: {data[:200]!r}"
            return
        if "error" in obj:
            rec.status, rec.error = "stream_error", _error_message(data)
            return
        for choice in obj.get("choices") or ():
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            if text:
                rec.chunk_times.append(t - clock0)
        have_usage = _apply_usage(rec, obj.get("usage")) or have_usage
    if not have_usage:
        rec.output_tokens = len(rec.chunk_times)
    if not rec.chunk_times:
        rec.status, rec.error = "bad_response", "the stream ended without any content"


class Client:
    """Units round-robin over targets, one keep-alive pool each (bench.http); fills RequestRecords."""

    def __init__(self, targets: list[str], model: str, opts: ClientOptions) -> None:
        self.targets = [base_url(t) for t in targets]
        self.path = b"/v1/chat/completions" if opts.endpoint == "chat" else b"/v1/completions"
        self.model, self.opts = model, opts
        headers = {"Content-Type": "application/json",
                   "Accept": "text/event-stream" if opts.stream else "application/json"}
        if opts.api_key:
            headers["Authorization"] = f"Bearer {opts.api_key}"
        self.headers = headers
        self.pools: list[HTTPClient] = []
        self.session: aiohttp.ClientSession | None = None     # probes and /metrics scrapes

    async def __aenter__(self) -> Client:
        self.pools = [HTTPClient(t, self.headers, self.opts.max_connections) for t in self.targets]
        # a few warm connections per target so the first arrivals do not pay for connects in a burst
        await asyncio.gather(*(p.warm(min(8, self.opts.max_connections or 8)) for p in self.pools))
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self.pools:
            p.close()
        if self.session is not None:
            await self.session.close()

    async def send(self, body: bytes, rec: RequestRecord, clock0: float) -> None:
        """Send one request, filling `rec`; never raises except on cancellation."""
        i = rec.unit % len(self.pools)      # a session or agent task stays on one target (its cache)
        rec.target = self.targets[i]
        rec.streamed = self.opts.stream
        pc = time.perf_counter
        rec.sent = pc() - clock0
        try:
            resp = await self.pools[i].request(self.path, body, self.opts.stream, self.opts.request_timeout_s,
                                               self.opts.stall_timeout_s)
        except HTTPFailure as e:
            rec.status, rec.error = e.kind, str(e)
            rec.end = pc() - clock0
            return
        rec.end = pc() - clock0
        if resp.status != 200:
            raw = resp.body or b"".join(line for _, line in resp.lines)
            rec.status, rec.error = f"http_{resp.status}", _error_message(raw)
        elif self.opts.stream:
            parse_stream(rec, resp.lines, clock0)
        else:
            try:
                obj = orjson.loads(resp.body)
            except orjson.JSONDecodeError:
                rec.status, rec.error = "bad_response", f"response is not JSON: {resp.body[:200]!r}"
                return
            if not _apply_usage(rec, obj.get("usage") if isinstance(obj, dict) else None):
                rec.output_tokens = rec.output_tokens_nominal


async def probe_target(target: str, api_key: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """The model ids a target serves; a clear BenchError when it cannot be reached."""
    url = base_url(target) + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession() as s, s.get(url, headers=headers,
                                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise BenchError(f"target {target} answered GET /v1/models with HTTP {resp.status}: "
                                 f"{_error_message(raw)}")
            data = orjson.loads(raw).get("data") or []
            return [str(m.get("id")) for m in data if isinstance(m, dict)]
    except aiohttp.ClientConnectorError as e:
        raise BenchError(f"cannot reach target {target}: {e.os_error or e}. Is the server running and is the "
                         "URL right (e.g. http://127.0.0.1:8000)?") from None
    except TimeoutError:
        raise BenchError(f"target {target} did not answer GET /v1/models within {timeout_s:g} s") from None
    except (aiohttp.ClientError, orjson.JSONDecodeError, AttributeError) as e:
        raise BenchError(f"target {target} gave an unusable /v1/models answer: {e}") from None
