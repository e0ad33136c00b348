"""Connection-level limits uvicorn's httptools protocol lacks: a header size cap and a header deadline.

uvicorn (0.3x-0.5x, httptools) accepts a header block of any size (httptools buffers an unfinished
header value in memory) and never times out a connection that has not finished its headers: one
client can hold memory with a 64 MB header, or a worker's sockets with slowloris connections that
dribble a byte every few seconds. `guarded_protocol()` returns a drop-in `http=` class for
`uvicorn.Config` that answers 431 past `max_header_bytes` and 408 when the header block is not
complete `header_timeout_s` after the connection opened (or after the first byte of a later
request on a keep-alive connection), both with the OpenAI error envelope and `Connection: close`.

The body deadline is the app's job (it is read through ASGI `receive`): see `read_body_within` and
`read_asgi_body`. The protocol also hands each request a future that completes when the client goes away
before its response is complete (`CLIENT_GONE` in the scope's extensions), so an app can react to a
disconnect without a task per request blocked in `receive()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inferstack.protocol.errors import APIError
from inferstack.protocol.http_limits import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_HEADER_BYTES

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_END = b"\r\n\r\n"
_LINGER_S = 1.0
# ASGI scope extension: an asyncio future that completes (result None) when the connection is lost
# before this request's response is complete; it never completes otherwise
CLIENT_GONE = "inferstack.client_gone"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a byte cap and a deadline on the header block of every request."""

    max_header_bytes = MAX_HEADER_BYTES
    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None  # connection_lost may come before the first arming
    _in_headers = False
    _between_requests = False  # a request completed; the next bytes start another one (metered, not timed)
    _discarding = False  # rejected: read and drop what the client still sends until the close
    _gone: list | None = None  # (cycle, future) of requests whose response is not complete yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_headers()
        self._arm_header_timer()  # also covers a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        for cycle, fut in self._gone or ():
            if not cycle.response_complete and not fut.done():
                fut.set_result(None)
        self._gone = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._in_headers:
            # Look for the end of the header block across chunk boundaries (keep 3 bytes of overlap).
            end = (self._tail + data).find(_END)
            seen = self._header_bytes + (len(data) if end < 0 else end + len(_END) - len(self._tail))
            if seen > self.max_header_bytes:
                self._reject(431, f"The request headers exceed the limit of {self.max_header_bytes} bytes.",
                             "headers_too_large")
                return
            self._header_bytes += len(data)
            self._tail = data[-3:]
        super().data_received(data)
        if self._in_headers and self._header_timer is None and not self._between_requests \
                and not self._discarding and not self.transport.is_closing():
            # A later request on a keep-alive connection whose header block did not arrive whole in this
            # read: its deadline starts now. One that did (nearly every request) needs no timer at all.
            self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The first byte of a later request on a keep-alive connection: meter its headers too, and time
        # them if they do not complete in this read (`data_received`; an idle keep-alive connection is
        # uvicorn's timeout_keep_alive's business, not ours).
        if not self._in_headers:
            self._start_headers()
        self._between_requests = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # Whatever arrives next is the next request's header block: count it from its first byte, so a
        # header block that arrives in one large read is refused like one that trickles in.
        self._start_headers()
        self._between_requests = True

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a new request (not an upgrade)
            cycle.transport = _HeadJoiner(self.transport, self.loop)
            gone = self.loop.create_future()
            self.scope["extensions"] = {**self.scope.get("extensions", {}), CLIENT_GONE: gone}
            # at most the pipelined requests of this connection are kept, answered ones dropped
            self._gone = [(c, f) for c, f in self._gone or () if not c.response_complete]
            self._gone.append((cycle, gone))

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _start_headers(self) -> None:
        self._in_headers = True
        self._header_bytes = 0
        self._tail = b""

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            self._reject(408, f"The request headers did not arrive within {self.header_timeout_s:g} s.",
                         "header_timeout")

    def _reject(self, status: int, message: str, code: str) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined request while a response streams: no room for ours
            return
        body = APIError(status, message, code=code).body()
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)))
        self.transport.write(head + body)
        # Lingering close: closing with unread input makes the kernel send RST, which can destroy the
        # response before the client reads it. Half-close, drain the client's bytes briefly, then close.
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


class _HeadJoiner:
    """The transport as one request's uvicorn response cycle sees it: the cycle writes the response head
    alone on ``http.response.start`` and the body on ``http.response.body``; held back, the head leaves
    with the first body bytes in one socket write: one system call and one TCP segment (which the kernel
    delivers to the reader inside the writer's call, on loopback) fewer per response. A head with no body
    write in the same event-loop step (a stream waiting for its first token) is written at the next step,
    so a client never waits on the head for longer than before."""

    __slots__ = ("_head", "_loop", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif not self._started and data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100 "):
            self._started = True  # the response head (an interim 100 Continue goes out at once)
            self._head = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


def guarded_protocol(max_header_bytes: int = MAX_HEADER_BYTES,
                     header_timeout_s: float = HEADER_TIMEOUT_S) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s})


class _Deadline:
    """Cancel the current task after ``timeout_s`` unless `done` is called first: `asyncio.timeout`'s
    job at a third of its cost (one timer handle), which matters because every request's body is read
    under one. `expired` says, after a CancelledError, whether it came from this deadline."""

    __slots__ = ("_cancelling", "_handle", "_task", "fired")

    def __init__(self, timeout_s: float, task: asyncio.Task | None = None) -> None:
        task = task or asyncio.current_task()
        assert task is not None
        self._task, self._cancelling, self.fired = task, task.cancelling(), False
        self._handle = task.get_loop().call_later(timeout_s, self._fire)  # no second loop lookup

    def _fire(self) -> None:
        self.fired = True
        self._task.cancel()

    def done(self) -> None:
        self._handle.cancel()

    def expired(self) -> bool:
        """The cancellation was ours and nobody else's (then it is taken back, as `asyncio.timeout` does)."""
        return self.fired and self._task.uncancel() <= self._cancelling


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds the limit of {limit} bytes.", code="body_too_large")


def _too_slow(timeout_s: float) -> APIError:
    return APIError(408, f"The request body did not arrive within {timeout_s:g} s.", code="body_timeout",
                    headers={"Connection": "close"})


async def read_body_within(chunks: AsyncIterator[bytes], limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The whole body from an ASGI chunk stream: 413 past `limit` bytes, 408 past `timeout_s` seconds
    (`read_asgi_body` over the stream's chunks, so both readers share one set of rules)."""
    stream = chunks.__aiter__()

    async def receive() -> dict:
        try:
            return {"type": "http.request", "body": await stream.__anext__(), "more_body": True}
        except StopAsyncIteration:
            return {"type": "http.request", "body": b"", "more_body": False}

    return await read_asgi_body(receive, limit, timeout_s)


async def read_asgi_body(receive: Callable[[], Awaitable[dict]], limit: int,
                         timeout_s: float = BODY_TIMEOUT_S, task: asyncio.Task | None = None) -> bytes:
    """The request body straight from ASGI ``receive`` (no iterator in between: the gateway reads every
    request's body here; the engine's `read_body_within` goes through it too): 413 past `limit` bytes, 408 past
    `timeout_s` seconds, a disconnect while reading is APIError(499). ``task``: the current task, when the
    caller has it (looking it up costs a getpid system call on Python 3.11)."""
    parts: list[bytes] = []
    size = 0
    deadline = _Deadline(timeout_s, task)
    try:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise APIError(499, "Client disconnected.")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            if not msg.get("more_body"):
                break
            parts.append(chunk)
    except asyncio.CancelledError:
        if deadline.expired():
            raise _too_slow(timeout_s) from None
        raise
    finally:
        deadline.done()
    if parts:
        parts.append(chunk)
        return b"".join(parts)
    return chunk
