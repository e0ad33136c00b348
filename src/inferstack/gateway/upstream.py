"""A lean HTTP/1.1 client for the gateway's upstream calls (keep-alive pool per endpoint).

Each request is one socket write (request line, headers and body joined) and responses are parsed
by httptools as bytes arrive; streamed bodies are handed over chunk by chunk. This does a fraction
of a general-purpose client's per-request work, which matters because a Python gateway is judged
against Rust routers. Only what engines speak is supported: HTTP/1.1 over TCP, Content-Length or
chunked bodies.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httptools


class UpstreamError(ConnectionError):
    """The connection failed, closed early, or timed out."""


class UpstreamTimeout(UpstreamError):
    """No data from the upstream within the read timeout: the request reached it (never sent again)."""


class _Conn(asyncio.Protocol):
    __slots__ = ("_chunks", "_done", "_error", "_headers", "_last_data", "_parser", "_read_timer", "_waiter",
                 "closed", "content_type", "got_bytes", "keep_alive", "loop", "pool", "read_timeout", "status",
                 "transport")

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.read_timeout = pool.read_timeout
        self._parser = httptools.HttpResponseParser(self)
        self._error: BaseException | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = b"application/json"
        self.keep_alive = True
        self._chunks: collections.deque[bytes] = collections.deque()
        self._done = False
        self._headers = False
        self._waiter: asyncio.Future | None = None
        self._read_timer: asyncio.TimerHandle | None = None
        self.got_bytes = False

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._last_data = self.loop.time()  # the read timer looks at this when it fires (`_timer_fired`)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed upstream response: {exc}"))
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._done:
            self._fail(UpstreamError(f"upstream closed the connection{f': {exc}' if exc else ''}"))

    # --- httptools callbacks ---
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 12 and name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self._headers = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self._done = True  # the read timer stays armed: when it fires on an idle connection it just ends
        self._wake()

    # --- helpers ---
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._stop_timer()
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        self._error = exc

    def _timer_fired(self) -> None:
        """The read deadline is ``read_timeout`` after the last bytes (or the request). One timer per
        connection, not one per request nor per network read: `send` arms it when none is armed, it is not
        cancelled when a response completes, and when it fires it ends on an idle connection, is set again
        for the rest of the deadline when data (or a later request) came since, and fails the request
        otherwise. On uvloop each timer set and cancelled is a libuv handle made and closed: not per request."""
        self._read_timer = None
        if self._done or self.closed:
            return  # between requests: the next `send` arms it again
        idle = self.loop.time() - self._last_data
        if idle < self.read_timeout:
            self._read_timer = self.loop.call_later(self.read_timeout - idle, self._timer_fired)
            return
        self._timed_out()

    def _timed_out(self) -> None:
        self._fail(UpstreamTimeout(f"no data from upstream for {self.read_timeout:g}s"))
        if self.transport is not None:
            self.transport.abort()

    def _stop_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # --- request API ---
    def send(self, data: bytes) -> None:
        if self.closed or self.transport.is_closing():
            # uvloop raises RuntimeError on a write to a closed transport: say what happened instead
            raise UpstreamError("upstream closed the connection before the request was sent")
        timer = self._read_timer
        self._reset()
        self._error = None
        self._last_data = self.loop.time()
        self._read_timer = timer or self.loop.call_later(self.read_timeout, self._timer_fired)
        self.transport.write(data)

    async def headers(self) -> None:
        while not self._headers:
            await self._wait()

    async def read(self) -> bytes:
        while not self._done:
            await self._wait()
        return self._take()

    def body_now(self) -> bytes | None:
        """`read` with no coroutine when the response is complete (nearly always, by the time its head was read:
        an engine writes head and body together); None while it is still arriving."""
        return self._take() if self._done else None

    def _take(self) -> bytes:
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        return data

    async def next_chunk(self) -> bytes | None:
        """The next body bytes as they arrived (several network reads joined), None at the end."""
        while not self._chunks:
            if self._done:
                return None
            await self._wait()
        if len(self._chunks) == 1:
            return self._chunks.popleft()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    @property
    def finished(self) -> bool:
        """The exchange is over: the response is complete, or it failed (`error`)."""
        return self._done or self._error is not None

    @property
    def error(self) -> BaseException | None:
        """Why the exchange failed (closed early, timed out, malformed), or None."""
        return self._error

    def release(self) -> None:
        """Back to the pool if the exchange finished cleanly (its read timer kept: `_timer_fired`), else close."""
        if self._done and self.keep_alive and not self.closed and self._error is None and not self.pool.closed:
            self.pool._idle.append(self)
        else:
            self.close()

    def close(self) -> None:
        self._stop_timer()
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one endpoint."""

    def __init__(self, base_url: str, connect_timeout: float, read_timeout: float, max_idle: int = 256):
        u = urlsplit(base_url)
        if u.scheme != "http":
            raise ValueError("the lean upstream client speaks plain http only")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.hostport = u.netloc.encode()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.closed = False
        self._idle: list[_Conn] = []

    def head(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The request line, Host and ``headers`` as sent: a template to build once and pass to
        `send_request` (which adds Content-Length and the blank line ending the head)."""
        parts = [method, b" ", path, b" HTTP/1.1\r\nhost: ", self.hostport, b"\r\n"]
        for k, v in headers:
            parts += [k, b": ", v, b"\r\n"]
        return b"".join(parts)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self), self.host, self.port), self.connect_timeout)
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc or 'timeout'}") from None
        return proto  # type: ignore[return-value]

    async def request(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> _Conn:
        """Send a request; returns the connection once the response headers are in.
        The caller must `release()` (or `close()`) it."""
        return await self.send_request(self.head(method, path, headers), body)

    def send_now(self, head: bytes, body: bytes) -> _Conn | None:
        """`send_request` with no wait: the request written on a kept connection, whose response is then read with
        `finished` (or `read`); None when no kept connection is open (then `send_request`, which connects)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.closed or conn.transport.is_closing():
                conn.close()
                continue
            conn.send(b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body))
            return conn
        return None

    async def send_request(self, head: bytes, body: bytes, sent: Callable[[], None] | None = None) -> _Conn:
        """`request` with the head built by `head` (plus any per-request header lines). ``sent`` is called
        once before this first suspends: right after the request is written on a kept connection, or
        before connecting a new one (work the caller put off until its request is on its way)."""
        data = b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body)
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            try:
                conn.send(data)
                if sent is not None:
                    sent, then = None, sent
                    then()
                while not conn._headers:  # `headers`, without a coroutine of its own (every request waits here)
                    await conn._wait()
                return conn
            except UpstreamError as exc:
                conn.close()
                if conn.got_bytes or isinstance(exc, UpstreamTimeout):
                    raise  # the server has the request: sending it again would run it twice
                # the server closed an idle keep-alive connection: try a fresh one
                break
            except BaseException:
                conn.close()
                raise
        if sent is not None:
            sent()
        conn = await self._connect()
        try:
            conn.send(data)
            await conn.headers()
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Close idle connections; those in use close when released."""
        self.closed = True
        for c in self._idle:
            c.close()
        self._idle.clear()


async def finished(conns: list[_Conn]) -> AsyncIterator[_Conn]:
    """Each of ``conns`` once its exchange is over (`_Conn.finished`: the whole response in, or failed), as they
    finish: several requests awaited in one coroutine, with one future per wait shared by the connections still
    pending, and no task per connection. A failed one is yielded with its `_Conn.error` set."""
    pending = conns
    while pending:
        waiting = []
        for conn in pending:
            if conn.finished:
                yield conn
            else:
                waiting.append(conn)
        if not waiting:
            return
        wake = waiting[0].loop.create_future()
        for conn in waiting:
            conn._waiter = wake
        try:
            await wake
        except UpstreamError:
            pass  # the failed connection has its `error`: yielded by the next pass
        finally:
            for conn in waiting:
                if conn._waiter is wake:
                    conn._waiter = None
        pending = waiting
