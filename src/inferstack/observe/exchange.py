"""Connections → HTTP exchanges → one `ObservedRequest` per request, with the times an SSE client would
see: arrival, first response byte, every content chunk, end."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from inferstack.observe.httpstream import Head, MessageStream
from inferstack.observe.sse import EventInfo, SSEScanner, classify, classify_json, classify_prefix

_OPENAI_PATH = re.compile(r"^(/[^?]*)?/v1/(chat/)?completions/?(\?.*)?$")
MAX_BODY_KEEP = 64 * 1024            # non-streamed response bytes kept to read `usage`


@dataclass
class ObservedRequest:
    pid: int
    fd: int
    method: str
    path: str
    arrival_ns: int                      # first byte of the request reached the server's socket
    read_ns: int = 0                     # ... and the server's read returned it (arrival if unknown)
    request_end_ns: int = 0
    first_byte_ns: int = 0               # first byte of the response written
    end_ns: int = 0                      # last byte of the response written
    status_code: int = 0
    streamed: bool = False
    chunk_ns: list[int] = field(default_factory=list)    # content chunks
    events: int = 0
    uncertain_events: int = 0            # classified from a truncated prefix
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    error: str = ""                      # why the exchange is incomplete, if it is
    request_body: bytes | None = None    # only with --capture-bodies

    @property
    def openai(self) -> bool:
        return self.method == "POST" and bool(_OPENAI_PATH.match(self.path))

    @property
    def endpoint(self) -> str:
        return "chat" if "/chat/" in self.path else "completions"

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_ns)

    def apply(self, info: EventInfo) -> None:
        self.model = self.model or info.model
        if info.usage:
            self.completion_tokens = info.usage["completion_tokens"]
            self.prompt_tokens = info.usage.get("prompt_tokens", self.prompt_tokens)
            self.cached_tokens = info.usage.get("cached_tokens", self.cached_tokens)
        if info.error and not self.error:
            self.error = "error event in the stream"


class _Requests:
    """Sink of the inbound stream: request heads queue up for their responses."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.current: ObservedRequest | None = None

    def head(self, head: Head) -> None:
        method, _, rest = head.start_line.partition(" ")
        self.current = ObservedRequest(self.conn.pid, self.conn.fd, method, rest.rsplit(" ", 1)[0], head.ts_ns,
                                       read_ns=head.read_ns)
        if self.conn.capture_bodies:
            self.current.request_body = b""
        self.conn.pending.append(self.current)

    def body(self, ts_ns: int, data: bytes | None, size: int) -> None:
        cur = self.current
        if cur is not None and cur.request_body is not None and data and len(cur.request_body) < MAX_BODY_KEEP:
            cur.request_body += data[:MAX_BODY_KEEP - len(cur.request_body)]

    def end(self, ts_ns: int) -> None:
        if self.current is not None:
            self.current.request_end_ns = ts_ns
            if self.current.request_body:
                self._model_from_body(self.current)
        self.current = None

    @staticmethod
    def _model_from_body(req: ObservedRequest) -> None:
        assert req.request_body is not None
        try:
            obj = orjson.loads(req.request_body)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict) and isinstance(obj.get("model"), str):
            req.model = obj["model"]

    def lost(self, ts_ns: int, reason: str) -> None:
        self.current = None

    def tls(self) -> None:
        self.conn.tls = True


class _Responses:
    """Sink of the outbound stream: each final response completes the oldest waiting request."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.req: ObservedRequest | None = None
        self.sse: SSEScanner | None = None
        self.body_buf = b""
        self.body_truncated = False
        self.done_seen = False

    def head(self, head: Head) -> None:
        if head.status < 200 or not self.conn.pending:
            return                 # interim 1xx, or a response to a request sent before we attached
        req = self.req = self.conn.pending.popleft()
        req.status_code, req.first_byte_ns = head.status, head.ts_ns
        req.streamed = head.headers.get("content-type", "").startswith("text/event-stream")
        self.sse = SSEScanner(self._event) if req.streamed else None
        self.body_buf, self.body_truncated, self.done_seen = b"", False, False

    def _event(self, ts_ns: int, raw: bytes, truncated: bool) -> None:
        assert self.req is not None
        info = classify(raw, truncated)
        self.done_seen = self.done_seen or info.done
        self.req.events += 1
        self.req.uncertain_events += not info.certain
        if info.content:
            self.req.chunk_ns.append(ts_ns)
        self.req.apply(info)

    def body(self, ts_ns: int, data: bytes | None, size: int) -> None:
        if self.req is None:
            return
        self.req.end_ns = ts_ns
        if self.sse is not None:
            if data is None:
                self.sse.gap(ts_ns)
            else:
                self.sse.feed(ts_ns, data)
        elif data is None or len(self.body_buf) >= MAX_BODY_KEEP:
            self.body_truncated = True
        else:
            self.body_buf += data

    def end(self, ts_ns: int) -> None:
        self._finish(ts_ns, "")

    def lost(self, ts_ns: int, reason: str) -> None:
        self._finish(ts_ns, reason)

    def _finish(self, ts_ns: int, error: str) -> None:
        req = self.req
        if req is None:
            return
        if error and self.done_seen:
            # the stream said `data: [DONE]`; only its last framing bytes were not seen (e.g. the final
            # chunk in an iovec past the captured ones): complete, ended with its last seen write
            error, ts_ns = "", req.end_ns
        req.end_ns = max(req.end_ns, ts_ns, req.first_byte_ns)
        req.error = req.error or error
        if self.sse is not None:
            self.sse.close()
        elif self.body_buf:
            self._plain_body(req)
        self.req = self.sse = None
        self.conn.done(req)

    def _plain_body(self, req: ObservedRequest) -> None:
        info = None
        if not self.body_truncated:
            try:
                info = classify_json(orjson.loads(self.body_buf))
            except orjson.JSONDecodeError:
                info = None
        req.apply(info or classify_prefix(self.body_buf))

    def tls(self) -> None:     # pragma: no cover - TLS is detected on the inbound side
        self.conn.tls = True


class Connection:
    def __init__(self, pid: int, fd: int, done: Callable[[ObservedRequest], None], synced: bool,
                 capture_bodies: bool = False) -> None:
        self.pid, self.fd, self.capture_bodies = pid, fd, capture_bodies
        self.pending: deque[ObservedRequest] = deque()
        self.tls = False
        self._done = done
        self._responses = _Responses(self)
        self.inbound = MessageStream(_Requests(self), requests=True, synced=synced)
        self.outbound = MessageStream(self._responses, requests=False, synced=synced)

    def feed(self, ts_ns: int, inbound: bool, data: bytes, total: int, wire_ns: int = 0) -> None:
        if inbound:
            self.inbound.feed(ts_ns, data, total, wire_ns)
        else:
            self.outbound.feed(ts_ns, data, total)

    def done(self, req: ObservedRequest) -> None:
        self._done(req)

    def close(self, ts_ns: int, reason: str | None = None) -> None:
        """The connection closed (reason None) or observation ended (`reason`): what is still open ends."""
        if reason is None:
            self.outbound.close(ts_ns)       # a body delimited by the close ends here
            reason = "connection closed before the response ended"
        if self._responses.req is not None:
            self._responses.lost(ts_ns, reason)
        for req in self.pending:
            req.error = reason
            req.end_ns = ts_ns
            self._done(req)
        self.pending.clear()

    @property
    def desyncs(self) -> int:
        return self.inbound.desyncs + self.outbound.desyncs
