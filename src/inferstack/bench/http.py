"""A lean HTTP/1.1 keep-alive client on asyncio protocols, for the bench's hot path.

Why not aiohttp here: at thousands of requests per second aiohttp's per-request machinery (request and
response objects, payload wrappers, connection acquisition) costs several hundred microseconds of one
core, and opening connections in bursts makes an open-loop client fall behind its schedule
(benchmarks/bench_client_capacity.py measures both). This client writes a prebuilt request, parses
the status line, Content-Length or chunked bodies, and for streams records (arrival time, line) per
SSE line; nothing else. Probes and /metrics scrapes still use aiohttp.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IDLE_REUSE_S = 3.0      # reuse a keep-alive connection only if it idled less than this


class HTTPFailure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind        # connection | timeout | stalled | bad_response
        self.reused = False
        self.nothing_received = False


@dataclass
class Response:
    status: int
    body: bytes = b""
    lines: list[tuple[float, bytes]] = field(default_factory=list)   # streamed: (perf_counter, line)


class _Exchange:
    """Parser state of one response on one connection."""

    __slots__ = ("body", "chunk_left", "chunked", "close", "done", "future", "head", "length", "lines",
                 "pending", "pending_raw", "phase", "status", "stream", "touched")

    def __init__(self, future: asyncio.Future, stream: bool) -> None:
        self.future, self.stream = future, stream
        self.head = bytearray()
        self.body = bytearray()
        self.pending = b""          # an SSE line not yet terminated
        self.pending_raw = b""      # chunked framing bytes not yet parsed
        self.lines: list[tuple[float, bytes]] = []
        self.phase = "head"            # head | body | chunk_size | chunk_data | chunk_crlf | trailer
        self.status = 0
        self.length = -1
        self.chunked = False
        self.close = False
        self.chunk_left = 0
        self.done = False
        self.touched = time.perf_counter()

    def feed(self, data: bytes, now: float) -> None:
        self.touched = now
        if self.phase == "head":
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            rest = bytes(self.head[end + 4:])
            self._parse_head(bytes(self.head[:end]))
            data = rest
            if not self.chunked and self.length == 0:
                self._finish()
                return
        if self.chunked:
            self._feed_chunked(data, now)
        else:
            self._body(data, now)
            if self.length >= 0 and len(self.body) >= self.length:
                self._finish()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            self.status = int(parts[1])
        except (IndexError, ValueError):
            raise HTTPFailure("bad_response", f"bad status line {lines[0][:80]!r}") from None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                self.close = True
        self.phase = "chunk_size" if self.chunked else "body"

    def _body(self, data: bytes, now: float) -> None:
        if not data:
            return
        if self.stream and self.status == 200:
            buf = self.pending + data
            *complete, self.pending = buf.split(b"\n")
            for line in complete:
                if line:
                    self.lines.append((now, line))
        else:
            self.body += data

    def _feed_chunked(self, data: bytes, now: float) -> None:
        buf = self.pending_raw + data if self.pending_raw else data
        i = 0
        n = len(buf)
        while i < n and not self.done:
            if self.phase == "chunk_size":
                j = buf.find(b"\r\n", i)
                if j < 0:
                    break
                size = int(buf[i:j].split(b";")[0], 16)
                i = j + 2
                if size == 0:
                    self.phase = "trailer"
                else:
                    self.chunk_left, self.phase = size, "chunk_data"
            elif self.phase == "chunk_data":
                take = min(self.chunk_left, n - i)
                self._body(buf[i:i + take], now)
                self.chunk_left -= take
                i += take
                if self.chunk_left == 0:
                    self.phase = "chunk_crlf"
            elif self.phase == "chunk_crlf":
                if n - i < 2:
                    break
                i += 2
                self.phase = "chunk_size"
            else:   # trailer: ends with an empty line
                j = buf.find(b"\r\n", i)
                if j < 0:
                    break
                if j == i:
                    self._finish()
                i = j + 2
        self.pending_raw = buf[i:]

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.pending:
            self.lines.append((self.touched, self.pending))
            self.pending = b""
        if not self.future.done():
            self.future.set_result(Response(self.status, bytes(self.body), self.lines))

    def fail(self, kind: str, message: str) -> None:
        self.done = True
        if not self.future.done():
            self.future.set_exception(HTTPFailure(kind, message))


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.idle_since = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None or ex.done:
            return
        try:
            ex.feed(data, time.perf_counter())
        except (HTTPFailure, ValueError) as e:
            ex.fail("bad_response", str(e))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        if ex is not None and not ex.done:
            if ex.phase == "body" and ex.length < 0 and not ex.chunked:
                ex._finish()      # body delimited by connection close
            else:
                ex.fail("connection", f"server closed the connection mid-response ({exc or 'EOF'})")

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HTTPClient:
    """Keep-alive pool to one origin; `request` sends a prebuilt body to a path."""

    def __init__(self, base_url: str, headers: dict[str, str], max_connections: int = 0) -> None:
        u = urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        host_header = u.netloc
        self.header_tail = ("".join(f"{k}: {v}\r\n" for k, v in headers.items())
                            + f"Host: {host_header}\r\n").encode()
        self.idle: deque[_Conn] = deque()
        self.gate = asyncio.Semaphore(max_connections) if max_connections else None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(_Conn, self.host, self.port, ssl=self.ssl)
        except OSError as e:
            raise HTTPFailure("connection", f"cannot connect to {self.host}:{self.port}: {e}") from None
        return proto

    async def warm(self, n: int) -> None:
        conns = await asyncio.gather(*(self._connect() for _ in range(n)), return_exceptions=True)
        self.idle.extend(c for c in conns if isinstance(c, _Conn))

    async def request(self, path: bytes, body: bytes, stream: bool, timeout_s: float, stall_s: float) -> Response:
        if self.gate is not None:
            async with self.gate:
                return await self._request(path, body, stream, timeout_s, stall_s)
        return await self._request(path, body, stream, timeout_s, stall_s)

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            c = self.idle.pop()
            # servers drop idle keep-alive connections (uvicorn after 5 s): do not race them
            if not c.closed and now - c.idle_since < IDLE_REUSE_S:
                return c
            c.abort()
        return None

    async def _request(self, path: bytes, body: bytes, stream: bool, timeout_s: float, stall_s: float) -> Response:
        conn = self._take_idle()
        pooled = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            return await self._exchange(conn, pooled, path, body, stream, timeout_s, stall_s)
        except HTTPFailure as e:
            # A reused connection the server closed just before our write fails with no response byte:
            # the request never reached the application, so one retry on a fresh connection is safe.
            if e.kind != "connection" or not e.nothing_received or not e.reused:
                raise
        return await self._exchange(await self._connect(), False, path, body, stream, timeout_s, stall_s)

    async def _exchange(self, conn: _Conn, reused: bool, path: bytes, body: bytes, stream: bool, timeout_s: float,
                        stall_s: float) -> Response:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        ex = _Exchange(fut, stream)
        conn.exchange = ex
        assert conn.transport is not None
        conn.transport.write(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
                             % (path, self.header_tail, len(body), body))
        start = time.perf_counter()

        def watchdog() -> None:
            if ex.done:
                return
            now = time.perf_counter()
            if now - start >= timeout_s:
                ex.fail("timeout", f"no complete response within {timeout_s:g} s")
                conn.abort()
            elif now - ex.touched >= stall_s:
                ex.fail("stalled", f"no data for {stall_s:g} s")
                conn.abort()
            else:
                nonlocal handle
                handle = loop.call_later(min(stall_s, timeout_s) / 4, watchdog)

        handle = loop.call_later(min(stall_s, timeout_s) / 4, watchdog)
        try:
            resp = await fut
        except HTTPFailure as e:
            e.reused, e.nothing_received = reused, not ex.head
            raise
        except asyncio.CancelledError:
            conn.abort()
            raise
        finally:
            handle.cancel()
            conn.exchange = None
        if ex.close or conn.closed:
            conn.abort()
        else:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        return resp

    def close(self) -> None:
        while self.idle:
            self.idle.pop().abort()
