"""One HTTP request's ASGI cycle on the front (`protocol/http_front.py`): ``receive``, ``send`` and the run
of the app, with the rules of uvicorn's RequestResponseCycle (same messages, same checks on headers and
lengths, 500 when the app fails before answering) at a fraction of its per-request work.

The response head is held until the first body bytes and leaves with them in one socket write (one system
call and one TCP segment fewer; on loopback the kernel delivers to the reader inside the writer's call). A
head with no length (a stream, sent chunked) is written at the next event-loop step if no body joins it
first, so a streaming client never waits on its head for a first token.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from inferstack.protocol.http_front import FrontProtocol

# A request's handler that bypasses ASGI (`FrontProtocol.direct`): it reads the request from the cycle (`headers`,
# `body_now`, `receive`, `gone`) and answers through `reply` or `send`.
DirectCall = Callable[["Cycle"], Awaitable[None]]


@runtime_checkable
class DirectApp(Protocol):
    """An ASGI app that also serves some POST targets without ASGI: exact request target -> handler."""

    direct_post: Mapping[bytes, DirectCall]

log = logging.getLogger("uvicorn.error")  # where uvicorn's own cycle reports app failures
# RFC 9110 token characters for names; control characters (but tab) for values: no header splitting
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS_LINES: dict[int, bytes] = {}
_NAMES_KEPT = 32  # response header names a connection remembers as checked (an app sends a handful)
_VALUES_KEPT = 32  # and values (the first response's fill it: a content type, an endpoint's name)
_CHUNKED_END = b"0\r\n\r\n"
_DISCONNECT = {"type": "http.disconnect"}
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


@dataclass(frozen=True, slots=True)
class FixedHeaders:
    """Response headers an app sends unchanged on many responses (a content type, the endpoint that served it),
    checked and encoded once (`fixed_headers`), so `Cycle.reply` writes them with no per-response check."""

    pairs: tuple[tuple[bytes, bytes], ...]  # names lower-cased: ASGI's response headers
    lines: bytes  # the same as sent: b"name: value\r\n" each


def fixed_headers(pairs: Iterable[tuple[bytes, bytes]]) -> FixedHeaders:
    """Check and encode headers as `Cycle` checks an app's (a name or value that could split the head raises
    RuntimeError); none may frame the response (Content-Length, Transfer-Encoding, Connection: ValueError)."""
    checked = []
    for raw, value in pairs:
        if _BAD_NAME.search(raw):
            raise RuntimeError("Invalid HTTP header name.")
        if _BAD_VALUE.search(value):
            raise RuntimeError("Invalid HTTP header value.")
        name = raw.lower()
        if name in _FRAMING:
            raise ValueError(f"{name.decode('latin-1')} frames a response: not a fixed header")
        checked.append((name, value))
    return FixedHeaders(tuple(checked), b"".join(b"%s: %s\r\n" % kv for kv in checked))


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b""
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    return line


class Cycle:
    """The request's body as it arrives (fed by the protocol) and its response as the app sends it."""

    __slots__ = ("_waiter", "body", "chunked", "delivered", "direct", "disconnected", "expect_100", "gone", "head",
                 "head_only", "headers", "keep_alive", "more_body", "proto", "remaining", "response_complete",
                 "response_started", "scope")

    def __init__(self, proto: FrontProtocol, scope: dict | None, headers: list[tuple[bytes, bytes]], keep_alive: bool,
                 expect_100: bool, gone: asyncio.Future, head_only: bool = False, direct: DirectCall | None = None):
        self.proto, self.scope, self.keep_alive, self.expect_100, self.gone = proto, scope, keep_alive, expect_100, gone
        self.headers = headers  # the request's, names lower-cased (the scope's list; a direct request has no scope)
        self.head_only = head_only  # a HEAD request: the head is sent, no body
        self.direct = direct  # the app's handler for this request without ASGI (`FrontProtocol.direct`), or None
        self.body: list[bytes] = []
        self.more_body = True
        self.delivered = False  # the last body message went to the app: `receive` now waits for the end
        self.disconnected = False
        self.response_started = self.response_complete = False
        self.chunked = False
        self.remaining = 0  # body bytes the Content-Length still expects
        self.head: bytes | None = None
        self._waiter: asyncio.Future | None = None

    def wake(self) -> None:
        """Body bytes, the body's end, the response's end or a disconnect: a waiting `receive` goes on."""
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self.proto.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def run(self, app: Callable[..., Any]) -> None:
        """The app on this request, or its direct handler (``direct``: then there is no scope); a failure before
        the response started is a 500, after it a closed connection."""
        # The app holds the scope from here on, not this cycle: the scope's `BODY_NOW` refers to the cycle, and a
        # cycle that referred back to its scope would be garbage only the collector frees (~13 objects a request).
        scope, self.scope = self.scope, None
        direct, self.direct = self.direct, None  # the handler is bound to the app, not to this cycle: no cycle
        try:
            if direct is not None:
                result = await direct(self)
            else:
                result = await app(scope, self.receive, self.send)
        except BaseException as exc:
            log.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.proto.transport.close()
            return
        if result is not None:
            log.error("ASGI callable should return None, but returned '%s'.", result)
            self.proto.transport.close()
        elif not self.response_started and not self.disconnected:
            log.error("ASGI callable returned without starting response.")
            await self._send_500()
        elif not self.response_complete and not self.disconnected:
            log.error("ASGI callable returned without completing response.")
            self.proto.transport.close()

    async def _send_500(self) -> None:
        await self.send({"type": "http.response.start", "status": 500,
                         "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"),
                                     (b"connection", b"close")]})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})

    async def receive(self) -> dict:
        proto = self.proto
        if self.expect_100 and not proto.transport.is_closing():
            proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.expect_100 = False
        if not proto.pipeline:  # paused past the high-water mark: the app takes the body now (a pipelined
            proto.resume_reading()  # request keeps reading paused until its turn)
        # wait only when there is nothing to hand over: body bytes not in yet, or the body all delivered
        while not self.disconnected and not self.response_complete and (
                self.delivered or (self.more_body and not self.body)):
            await self._wait()
        if self.disconnected or self.response_complete:
            return _DISCONNECT
        parts, self.body = self.body, []
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if not self.more_body:
            self.delivered = True
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    def body_now(self) -> bytes | None:
        """The whole request body, when all of it is in and the app has read none of it: what `receive` would
        hand over in one message, without its coroutine, its message dict or a deadline timer around it (the
        scope's `BODY_NOW` extension; nearly every request's body arrives with its headers). None when the
        body is not complete yet (or `Expect: 100-continue` must be answered first): read it with `receive`."""
        if self.more_body or self.delivered or self.disconnected or self.expect_100:
            return None
        proto = self.proto
        if not proto.pipeline:  # as `receive`: a body past the high-water mark paused reading; the app has it now
            proto.resume_reading()
        parts, self.body = self.body, []
        self.delivered = True
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def send(self, message: dict) -> None:
        proto = self.proto
        if proto.write_paused and not self.disconnected:
            await proto.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
            self.response_started = True
            self.expect_100 = False
            self.head = self._encode_head(message["status"], message.get("headers", ()))
            if self.chunked:  # a stream: its head goes out at the next step unless its first bytes come first
                proto.loop.call_soon(self._flush_head)
            return
        if self.response_complete or message["type"] != "http.response.body":
            raise RuntimeError(f"Unexpected ASGI message '{message['type']}' sent"
                               f"{', after response already completed' if self.response_complete else ''}.")
        self._write_body(message.get("body", b""), message.get("more_body", False))

    async def reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                    fixed: FixedHeaders | None = None) -> None:
        """A whole response in one call, by the rules of `send` (same head, same checks, one write), without its
        two messages and second await: how a direct handler (`FrontProtocol.direct`) answers. ``fixed``: more
        headers, checked once already (`fixed_headers`), sent after ``headers``."""
        if self.response_started or self.disconnected or self.proto.write_paused:
            if fixed is not None:
                headers = [*headers, *fixed.pairs]
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        self.response_started = True
        self.expect_100 = False
        self.head = self._encode_head(status, headers, fixed.lines if fixed is not None else b"")
        self._write_body(body, False)

    def write_now(self, body: bytes) -> bool:
        """More bytes of a started response, as `send` writes an ``http.response.body`` message with ``more_body``,
        without the message and its coroutine when nothing has to wait (a streamed response's chunks). False when
        `send` must take it: the client's writes are paused (it waits for the drain), or no response is open."""
        if self.disconnected:
            return True  # as `send`: nothing more goes out
        if self.proto.write_paused or not self.response_started or self.response_complete:
            return False
        self._write_body(body, True)
        return True

    def _write_body(self, body: bytes, more: bool) -> None:
        if self.head_only:
            data = b""
        elif self.chunked:
            data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                data += _CHUNKED_END
        else:
            self.remaining -= len(body)
            if self.remaining < 0:
                raise RuntimeError("Response content longer than Content-Length")
            data = body
        if self.head is not None:
            data, self.head = self.head + data, None
        transport = self.proto.transport
        if data:
            transport.write(data)
        if not more:
            if self.remaining > 0 and not self.head_only:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.wake()
            if not self.keep_alive:
                transport.close()
            self.proto.response_complete(self)

    def _flush_head(self) -> None:
        head, self.head = self.head, None
        if head is not None and not self.disconnected and not self.proto.transport.is_closing():
            self.proto.transport.write(head)

    def _encode_head(self, status: int, headers: Any, fixed: bytes = b"") -> bytes:
        """Status line, the server's default headers (date), the app's headers checked as uvicorn checks them,
        ``fixed`` header lines (`FixedHeaders.lines`), and the framing: Content-Length as given, else chunked
        (not for HEAD, 204, 304)."""
        content = [status_line(status), self.proto.default_head]
        length: bytes | None = None
        close = False
        # a regex search costs ~1 µs on a header name: a name this connection already sent is not searched again
        names, values = self.proto.header_names, self.proto.header_values
        for raw, value in headers:
            name = names.get(raw) if raw.__class__ is bytes else None  # a bytearray cannot be a key
            if name is None:
                if _BAD_NAME.search(raw):
                    raise RuntimeError("Invalid HTTP header name.")
                name = raw.lower()
                if len(names) < _NAMES_KEPT and raw.__class__ is bytes:
                    names[raw] = name
            # letters and digits only (a length, a request id) or a value this connection sent: no control
            # characters, no regex search (~0.6 µs a value)
            if value.__class__ is not bytes or not (value.isalnum() or value in values):
                if _BAD_VALUE.search(value):
                    raise RuntimeError("Invalid HTTP header value.")
                if len(values) < _VALUES_KEPT and value.__class__ is bytes:
                    values.add(value)
            if name == b"content-length" and length is None and not self.chunked:
                length = value
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.chunked = True
            elif name == b"connection" and b"close" in (t.strip() for t in value.lower().split(b",")):
                self.keep_alive = False
                close = True
            content += (name, b": ", value, b"\r\n")
        content.append(fixed)
        if not self.keep_alive and not close:
            content.append(b"connection: close\r\n")
        if length is not None and not self.chunked:
            self.remaining = int(length)
        elif not self.chunked and not self.head_only and status not in (204, 304):
            self.chunked = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)
