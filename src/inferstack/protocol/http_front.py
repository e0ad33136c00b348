"""The HTTP/1.1 front of the gateway and the engine: an asyncio protocol on httptools that runs an ASGI app.

uvicorn still runs the process (sockets, lifespan, signals, graceful drain: it builds this class through
``uvicorn.Config(http=...)`` and calls `shutdown` on every connection when draining), but each connection
and request is handled here, not by uvicorn's HttpToolsProtocol and RequestResponseCycle, which do more per
request than our servers need (measured on a 2-core machine, `benchmarks/http_front_cost.py`: uvicorn's
protocol 50-70 µs of CPU per request, this one 40-45, a bare httptools protocol with no ASGI 15-20;
docs/gateway.md, "The HTTP front").

Guards uvicorn lacks (`guarded_protocol` sets the limits): a header block over ``max_header_bytes`` gets
431 and one not complete ``header_timeout_s`` after the connection opened (or after the first byte of a
later request on a keep-alive connection) gets 408, both with the OpenAI error envelope and
``Connection: close``. Every request's scope carries a future that completes when the client goes away
before the response is complete (`CLIENT_GONE`), so an app reacts to a disconnect without a task blocked in
``receive()``, and a function that hands over the whole body when it is already in (`BODY_NOW`).
Kept from uvicorn: keep-alive with its idle timeout, pipelined requests answered in order,
write flow control, ``Expect: 100-continue``, 400 on a malformed request, HTTP/1.0, HEAD.

An app may serve some POST targets without ASGI: its ``direct_post`` map (exact request target -> handler, see
`http_cycle.DirectCall`) is looked up before a scope is built, and a matching request's handler gets the cycle
itself (headers, `Cycle.body_now`, `Cycle.receive`, the client-gone future, `Cycle.reply` / `Cycle.send`): no
scope dict, no message dicts. Everything above (limits, keep-alive, pipelining, checks on response headers and
lengths, 500 on failure) applies to it the same. The gateway serves its completion paths this way.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections import deque
from collections.abc import Mapping
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from inferstack.protocol.errors import APIError
from inferstack.protocol.http_cycle import Cycle, DirectApp, DirectCall, status_line
from inferstack.protocol.http_limits import HEADER_TIMEOUT_S, MAX_HEADER_BYTES

log = logging.getLogger("uvicorn.error")
CLIENT_GONE = "inferstack.client_gone"  # ASGI scope extension: see the module's doc
BODY_NOW = "inferstack.body_now"  # ASGI scope extension: `Cycle.body_now`, the body without `receive`
_END = b"\r\n\r\n"
_LINGER_S = 1.0
_HIGH_WATER = 65536  # buffered request body bytes past which reading pauses (uvicorn's limit)


class FrontProtocol(asyncio.Protocol):
    """One client connection: parse requests, run the app on each in turn, guard the header block."""

    max_header_bytes = MAX_HEADER_BYTES
    header_timeout_s = HEADER_TIMEOUT_S
    transport: asyncio.Transport

    def __init__(self, config: Any, server_state: Any, app_state: dict, _loop: Any = None):
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state, self.app_state = server_state, app_state
        self.connections, self.tasks = server_state.connections, server_state.tasks
        self.root_path = config.root_path
        # POST targets the app serves without ASGI (its ``direct_post`` map: request target -> handler); none under
        # a root path (the app's routes would see the prefixed path) or with a middleware in between
        self.direct: Mapping[bytes, DirectCall] = (
            self.app.direct_post if isinstance(self.app, DirectApp) and not config.root_path else {})
        self.limit_concurrency = config.limit_concurrency
        self.keep_alive_s = config.timeout_keep_alive
        self.parser = httptools.HttpRequestParser(self)
        self.cycle: Cycle | None = None
        self.pipeline: deque[Cycle] = deque()  # requests that arrived while an earlier one is answered
        self.write_paused = self.read_paused = False
        self._drained: asyncio.Future | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # a keep-alive connection between requests, since when
        self._in_headers = self._between_requests = self._discarding = False
        self._header_bytes = 0
        self._tail = b""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect_100 = False
        self._default_src: list | None = None
        self._default_head = b""
        # response header names this connection's responses already used, checked, lower-cased (`Cycle`)
        self.header_names: dict[bytes, bytes] = {}
        # response header values this connection's responses already sent, checked (`Cycle`)
        self.header_values: set[bytes] = set()

    @property
    def default_head(self) -> bytes:
        """The server's default response headers, encoded once per change (uvicorn replaces the list when
        ``date`` moves, once a second)."""
        headers = self.server_state.default_headers
        if headers is not self._default_src:
            self._default_src = headers
            self._default_head = b"".join(b"%s: %s\r\n" % kv for kv in headers)
        return self._default_head

    # ---- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connections.add(self)
        self.transport = transport  # type: ignore[assignment]
        self.server, self.client = get_local_addr(self.transport), get_remote_addr(self.transport)
        self.scheme = "https" if is_ssl(self.transport) else "http"
        self._start_headers()
        self._arm_header_timer()  # also covers a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._cancel_header_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for cycle in (self.cycle, *self.pipeline):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                if not cycle.gone.done():
                    cycle.gone.set_result(None)
            if cycle is not None:
                cycle.wake()
        self.resume_writing()
        if exc is None:
            self.transport.close()

    def eof_received(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self._idle_since = None
        if self._discarding:
            return
        if self._in_headers and not self._meter_headers(data):
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrades here: the request was answered as plain HTTP
        except httptools.HttpParserError:
            log.warning("Invalid HTTP request received.")
            self._send_400("Invalid HTTP request received.")
            return
        if self._in_headers and self._header_timer is None and not self._between_requests \
                and not self._discarding and not self.transport.is_closing():
            # A later request on a keep-alive connection whose header block did not arrive whole in this
            # read: its deadline starts now. One that did (nearly every request) needs no timer at all.
            self._arm_header_timer()

    def _meter_headers(self, data: bytes) -> bool:
        """Count header-block bytes across reads (3 bytes of overlap find the end split over two); False
        when the block is over the cap (answered 431)."""
        end = (self._tail + data).find(_END)
        seen = self._header_bytes + (len(data) if end < 0 else end + len(_END) - len(self._tail))
        if seen > self.max_header_bytes:
            self._reject(431, f"The request headers exceed the limit of {self.max_header_bytes} bytes.",
                         "headers_too_large")
            return False
        self._header_bytes += len(data)
        self._tail = data[-3:]
        return True

    # ---- parser callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._expect_100 = False
        # The first byte of a later request on a keep-alive connection: meter its headers too, and time
        # them if they do not complete in this read (`data_received`).
        if not self._in_headers:
            self._start_headers()
        self._between_requests = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_100 = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        parser = self.parser
        version = parser.get_http_version()
        keep_alive = version != "1.0" and parser.should_keep_alive()
        gone = self.loop.create_future()
        method = parser.get_method()
        # the app's own handler for this method and exact request target (no query, no absolute form): no scope
        direct = self.direct.get(self._url) if method == b"POST" else None
        if direct is not None:
            cycle = Cycle(self, None, self._headers, keep_alive, self._expect_100, gone, direct=direct)
        else:
            scope = self._scope(version, method, gone)
            cycle = Cycle(self, scope, self._headers, keep_alive, self._expect_100, gone, scope["method"] == "HEAD")
            scope["extensions"][BODY_NOW] = cycle.body_now
        if self.cycle is None or self.cycle.response_complete:
            self.cycle = cycle
            self._start(cycle)
        else:  # pipelined: answered after the one in progress, in order
            self.pause_reading()
            self.pipeline.append(cycle)

    def _scope(self, version: str, method: bytes, gone: asyncio.Future) -> dict:
        """The request's ASGI scope (its `BODY_NOW` is the cycle's, added once the cycle exists)."""
        url = httptools.parse_url(self._url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": version,
                "server": self.server, "client": self.client, "scheme": self.scheme, "root_path": self.root_path,
                "headers": self._headers, "state": self.app_state.copy(), "method": method.decode("ascii"),
                "path": self.root_path + path, "raw_path": self.root_path.encode("ascii") + raw_path,
                "query_string": url.query or b"", "extensions": {CLIENT_GONE: gone}}

    def on_body(self, body: bytes) -> None:
        cycle = self.pipeline[-1] if self.pipeline else self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.body.append(body)
        if len(body) > _HIGH_WATER or sum(map(len, cycle.body)) > _HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.pipeline[-1] if self.pipeline else self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.more_body = False
            cycle.wake()
        # Whatever arrives next is the next request's header block: count it from its first byte, so a
        # header block that arrives in one large read is refused like one that trickles in.
        self._start_headers()
        self._between_requests = True

    # ---- requests -----------------------------------------------------------------------------
    def _start(self, cycle: Cycle) -> None:
        app = self.app
        if self.limit_concurrency is not None and (len(self.connections) >= self.limit_concurrency
                                                   or len(self.tasks) >= self.limit_concurrency):
            app = service_unavailable
            cycle.direct = None  # answered by uvicorn's 503 (which reads no scope), not by the app
            log.warning("Exceeded concurrency limit.")
        task = self.loop.create_task(cycle.run(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def response_complete(self, cycle: Cycle) -> None:
        """The cycle's response is out: start the next pipelined request, or wait for one (keep-alive)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.pipeline:
            self.cycle = self.pipeline.popleft()
            self._start(self.cycle)
            return
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.keep_alive_s, self._idle_check)

    def _idle_check(self) -> None:
        """One keep-alive timer per connection, not one per request: when it fires after activity, it is
        set again for the rest of the idle timeout."""
        self._idle_timer = None
        since = self._idle_since
        if since is None or self.transport.is_closing():
            return  # busy: `response_complete` arms it again
        idle = self.loop.time() - since
        if idle >= self.keep_alive_s:
            self.transport.close()
        else:
            self._idle_timer = self.loop.call_later(self.keep_alive_s - idle, self._idle_check)

    def shutdown(self) -> None:
        """Graceful drain (uvicorn calls it): close an idle connection, let a busy one finish its response."""
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        else:
            self.cycle.keep_alive = False

    # ---- flow control -------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def drain(self) -> None:
        if self._drained is None:
            self._drained = self.loop.create_future()
        await asyncio.shield(self._drained)

    # ---- the header guard ---------------------------------------------------------------------
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
        self.transport.write(b"%scontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status_line(status), len(body), body))
        # Lingering close: closing with unread input makes the kernel send RST, which can destroy the
        # response before the client reads it. Half-close, drain the client's bytes briefly, then close.
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)

    def _send_400(self, msg: str) -> None:
        body = msg.encode("ascii")
        self.transport.write(b"%s%scontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status_line(400), self.default_head, len(body), body))
        self.transport.close()


def guarded_protocol(max_header_bytes: int = MAX_HEADER_BYTES,
                     header_timeout_s: float = HEADER_TIMEOUT_S) -> type[FrontProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with these header limits."""
    return type("FrontProtocol", (FrontProtocol,),
                {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s})
