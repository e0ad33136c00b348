"""Our HTTP front (`protocol/http_front.py`) driven without a socket: pipelined requests answered in order,
a malformed request refused, a disconnect reaching the app, keep-alive idle timeout (one timer per connection).
The header limits and the held response head are tested in test_gateway_request_cost.py."""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.server import ServerState

from inferstack.protocol.http_guard import BODY_NOW, CLIENT_GONE, guarded_protocol
from support.fake_transport import SocketlessTransport


async def _until(cond, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5.0
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.005)


def _connect(app, **config):
    cfg = uvicorn.Config(app, lifespan="off", log_level="warning", **config)
    protocol = guarded_protocol()(config=cfg, server_state=ServerState(), app_state={})
    transport = SocketlessTransport()
    protocol.connection_made(transport)
    return protocol, transport


def test_pipelined_requests_are_answered_in_order_and_bodies_reach_their_own_request():
    release_first = asyncio.Event()
    seen: list[tuple[str, bytes]] = []

    async def app(scope, receive, send):
        body = (await receive())["body"]
        seen.append((scope["path"], body))
        if scope["path"] == "/first":
            await release_first.wait()  # the second request must not start before this one answers
        answer = scope["path"].encode() + b":" + body
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})

    async def main():
        protocol, transport = _connect(app)
        protocol.data_received(b"POST /first HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nonePOST /second HTTP/1.1"
                               b"\r\nhost: x\r\ncontent-length: 3\r\n\r\ntwo")
        await _until(lambda: seen, "first request started")
        for _ in range(20):  # loop turns in which a wrongly started second request would have run
            await asyncio.sleep(0)
        assert seen == [("/first", b"one")] and transport.paused  # the pipelined one waits, reading paused
        release_first.set()
        await _until(lambda: len(transport.writes) == 2, "both answered")
        assert transport.writes[0].endswith(b"\r\n\r\n/first:one")
        assert transport.writes[1].endswith(b"\r\n\r\n/second:two")
        assert seen == [("/first", b"one"), ("/second", b"two")] and not transport.paused
        protocol.connection_lost(None)

    asyncio.run(main())


def test_a_malformed_request_gets_400_and_the_connection_closes():
    async def app(scope, receive, send):  # never reached
        raise AssertionError("app called for a malformed request")

    async def main():
        protocol, transport = _connect(app)
        protocol.data_received(b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
        assert transport.writes[0].startswith(b"HTTP/1.1 400 Bad Request\r\n") and transport.closed
        assert transport.writes[0].endswith(b"Invalid HTTP request received.")
        protocol.connection_lost(None)

    asyncio.run(main())


def test_a_client_gone_mid_request_completes_its_future_and_receive_says_disconnect():
    got: dict = {}

    async def app(scope, receive, send):
        gone = scope["extensions"][CLIENT_GONE]
        await receive()
        got["waiting"] = True
        await gone  # completes only when the connection is lost before the response is complete
        got["after"] = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})  # dropped: nobody to answer

    async def main():
        protocol, transport = _connect(app)
        protocol.data_received(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        await _until(lambda: "waiting" in got, "app waiting on the client-gone future")
        protocol.connection_lost(ConnectionResetError())
        await _until(lambda: "after" in got, "app saw the disconnect")
        assert got["after"] == {"type": "http.disconnect"} and transport.writes == []

    asyncio.run(main())


def test_keep_alive_idle_connections_close_after_the_timeout_and_busy_ones_do_not():
    answered: list[float] = []

    async def app(scope, receive, send):
        await receive()
        if scope["path"] == "/slow":
            await asyncio.sleep(0.35)  # longer than the keep-alive timeout: a busy connection stays open
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        answered.append(asyncio.get_running_loop().time())  # the response is complete (written) here

    async def main():
        protocol, transport = _connect(app, timeout_keep_alive=0.2)
        loop = asyncio.get_running_loop()
        protocol.data_received(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        await _until(lambda: len(transport.writes) == 1, "first answer")
        # the first answer armed the idle timer; the next request keeps the connection busy past it
        protocol.data_received(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        await _until(lambda: len(transport.writes) == 2, "slow answer")
        assert not transport.closed
        await _until(lambda: transport.closed, "idle close")
        assert loop.time() - answered[-1] >= 0.2  # counted from the last response, not from the first timer
        protocol.connection_lost(None)

    asyncio.run(main())


def test_body_now_hands_over_a_complete_body_and_declines_one_still_arriving():
    """`BODY_NOW`: the whole body without `receive` when it came with the headers; None while it is still
    arriving or while `Expect: 100-continue` awaits its answer (then `receive` reads it as before)."""
    got: dict[str, list] = {}

    async def app(scope, receive, send):
        body_now = scope["extensions"][BODY_NOW]
        first = body_now()
        seen = got.setdefault(scope["path"], [first])
        if first is None:
            while (msg := await receive())["more_body"]:
                seen.append(msg["body"])
            seen.append(msg["body"])
        assert body_now() is None  # handed over once
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        protocol, transport = _connect(app)
        protocol.data_received(b"POST /whole HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        await _until(lambda: len(transport.writes) == 1, "first answered")
        protocol.data_received(b"POST /split HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhe")
        await _until(lambda: "/split" in got, "second started")
        protocol.data_received(b"llo")
        await _until(lambda: len(transport.writes) == 2, "second answered")
        protocol.data_received(b"POST /expect HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n"
                               b"\r\nhello")
        await _until(lambda: len(transport.writes) == 4, "third answered after its 100 Continue")
        assert got["/whole"] == [b"hello"]
        assert got["/split"][0] is None and b"".join(got["/split"][1:]) == b"hello"
        assert got["/expect"][0] is None and b"".join(got["/expect"][1:]) == b"hello"
        assert transport.writes[2] == b"HTTP/1.1 100 Continue\r\n\r\n"
        protocol.connection_lost(None)

    asyncio.run(main())


def test_read_asgi_body_applies_its_limit_to_a_body_handed_over_whole():
    from inferstack.protocol.errors import APIError
    from inferstack.protocol.http_guard import read_asgi_body

    async def receive():
        return {"type": "http.request", "body": b"from-receive", "more_body": False}

    async def main():
        assert await read_asgi_body(receive, 100, 1.0, body_now=lambda: b"x" * 100) == b"x" * 100
        assert await read_asgi_body(receive, 100, 1.0, body_now=lambda: None) == b"from-receive"
        try:
            await read_asgi_body(receive, 100, 1.0, body_now=lambda: b"x" * 101)
        except APIError as exc:
            assert (exc.status, exc.code) == (413, "body_too_large")
        else:
            raise AssertionError("a body over the limit was accepted")

    asyncio.run(main())


def test_a_request_leaves_no_garbage_for_the_cycle_collector():
    """Each request's objects are freed by reference counting alone: with a reference cycle per request (the
    scope's `BODY_NOW` referring to a cycle that referred back to the scope made one) the collector runs under
    load and walks every live request's objects each time."""
    import gc

    async def app(scope, receive, send):
        assert scope["extensions"][BODY_NOW]() == b"hello"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        protocol, transport = _connect(app)
        request = b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
        protocol.data_received(request)  # warm-up: first-use caches
        await _until(lambda: len(transport.writes) == 1, "warm-up answered")
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(2, 52):
                protocol.data_received(request)
                await _until(lambda i=i: len(transport.writes) == i, "answered")
            gc.collect()
            garbage = [type(o).__qualname__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert garbage == []
        protocol.connection_lost(None)

    asyncio.run(main())


def test_response_header_checks_hold_on_a_connection_that_already_sent_headers():
    """Names a connection already used are not searched again; a new bad name, or a bad value under a known name,
    is still refused (the app fails: nothing of that response is written and the connection closes), and names go
    out lower-cased."""
    answers = {b"/good": [(b"X-Served", b"a"), (b"Content-Type", b"text/plain")],
               b"/split": [(b"X-Served", b"c\r\nset-cookie: x=1")],  # a known name, a value that splits the head
               b"/bad-name": [(b"X-Served", b"a"), (b"Bad Name", b"d")]}

    async def app(scope, receive, send):
        await receive()
        headers = [*answers[scope["raw_path"]], (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def after_a_good_one(path: bytes) -> tuple[list[bytes], bool]:
        protocol, transport = _connect(app)
        for n, p in enumerate((b"/good", path)):
            protocol.data_received(b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % p)
            await _until(lambda n=n: len(transport.writes) > n or transport.closed, "answered or closed")
        closed = transport.closed
        protocol.connection_lost(None)
        return transport.writes, closed

    (good, again), closed = asyncio.run(after_a_good_one(b"/good"))
    assert good == again and b"\r\nx-served: a\r\ncontent-type: text/plain\r\n" in good and not closed
    for path in (b"/split", b"/bad-name"):
        writes, closed = asyncio.run(after_a_good_one(path))
        assert writes == [good] and closed, path


def test_response_header_values_remembered_per_connection_stay_checked_and_bounded():
    """A value made of letters and digits, or one this connection already sent, skips the regex search; the values
    remembered are bounded, and a value that splits the head is refused after the memory filled up."""
    async def app(scope, receive, send):
        await receive()
        path = scope["raw_path"]
        value = b"c\r\nset-cookie: x=1" if path == b"/split" else b"v-" + path[1:]  # not letters and digits only
        headers = [(b"x-served", value), (b"x-id", path[1:].zfill(32)), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        protocol, transport = _connect(app)
        for n in range(40):  # 40 new values: more than a connection remembers
            protocol.data_received(b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % n)
            await _until(lambda n=n: len(transport.writes) > n, "answered")
        remembered = set(protocol.header_values)
        assert b"\r\nx-served: v-39\r\nx-id: " + b"39".zfill(32) + b"\r\n" in transport.writes[-1]
        protocol.data_received(b"GET /split HTTP/1.1\r\nhost: x\r\n\r\n")
        await _until(lambda: transport.closed, "closed")
        written = len(transport.writes)
        protocol.connection_lost(None)
        return remembered, written

    remembered, written = asyncio.run(main())
    assert len(remembered) == 32 and b"v-0" in remembered and b"v-39" not in remembered
    assert all(not v.isalnum() for v in remembered)  # letters-and-digits values are never stored
    assert written == 40  # nothing of the refused response went out


class _DirectApp:
    """An ASGI app with a direct handler for ``POST /direct`` (`FrontProtocol.direct`)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []
        self.direct_post = {b"/direct": self.direct}

    async def direct(self, cycle) -> None:
        body = cycle.body_now()
        if body is None:
            body = (await cycle.receive())["body"]
        self.seen.append(("direct", (dict(cycle.headers)[b"x-name"], body)))
        await cycle.reply(200, [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))], body)

    async def __call__(self, scope, receive, send) -> None:
        self.seen.append(("asgi", (scope["method"], scope["raw_path"], scope["query_string"])))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"asgi"})


def test_a_direct_post_skips_asgi_and_answers_in_one_write_in_order_with_pipelined_asgi_requests():
    """The app's ``direct_post`` handler serves exactly its POST target (no scope, one write for head and body);
    another method, a query string or an unknown path goes through ASGI, and pipelined requests of both kinds
    are answered in order."""
    app = _DirectApp()

    async def main():
        wrapped, _ = _connect(app)  # behind uvicorn's proxy-headers middleware: nothing goes around it
        assert wrapped.direct == {}
        wrapped.connection_lost(None)
        protocol, transport = _connect(app, proxy_headers=False)
        protocol.data_received(b"POST /direct HTTP/1.1\r\nhost: x\r\nX-Name: a\r\ncontent-length: 5\r\n\r\nhello"
                               b"GET /direct HTTP/1.1\r\nhost: x\r\n\r\n"
                               b"POST /direct?q=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
                               b"POST /direct HTTP/1.1\r\nhost: x\r\nx-name: b\r\ncontent-length: 3\r\n\r\nbye")
        await _until(lambda: len(transport.writes) == 4, "all four answered")
        assert app.seen == [("direct", (b"a", b"hello")), ("asgi", ("GET", b"/direct", b"")),
                            ("asgi", ("POST", b"/direct", b"q=1")), ("direct", (b"b", b"bye"))]
        first, last = transport.writes[0], transport.writes[3]
        assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\nhello")
        assert b"content-type: text/plain\r\ncontent-length: 5\r\n" in first
        assert last.endswith(b"\r\n\r\nbye") and transport.writes[1].endswith(b"\r\n\r\nasgi")
        # a direct request's body still arriving is read through `receive`
        protocol.data_received(b"POST /direct HTTP/1.1\r\nhost: x\r\nx-name: c\r\ncontent-length: 4\r\n\r\nsl")
        protocol.data_received(b"ow")
        await _until(lambda: len(transport.writes) == 5, "split body answered")
        assert app.seen[-1] == ("direct", (b"c", b"slow")) and transport.writes[4].endswith(b"\r\n\r\nslow")
        protocol.connection_lost(None)

    asyncio.run(main())


def test_a_direct_reply_keeps_the_header_checks_of_send():
    """A bad header value fails the reply as it fails `send` (uvicorn's rule too): nothing written, the connection
    closed; a handler failing before its reply gets a 500; past `limit_concurrency`, the front's 503."""
    async def bad_value(cycle) -> None:
        await cycle.reply(200, [(b"x-bad", b"a\r\nset-cookie: x"), (b"content-length", b"2")], b"ok")

    async def fails(cycle) -> None:
        raise ValueError("before any reply")

    class App:
        def __init__(self) -> None:
            self.direct_post = {b"/bad": bad_value, b"/fails": fails}

        async def __call__(self, scope, receive, send) -> None:
            raise AssertionError("not through ASGI")

    async def main():
        protocol, transport = _connect(App(), proxy_headers=False)
        protocol.data_received(b"POST /bad HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        await _until(lambda: transport.closed, "closed")
        assert transport.writes == []
        protocol, transport = _connect(App(), proxy_headers=False)
        protocol.data_received(b"POST /fails HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        await _until(lambda: transport.writes, "answered")
        assert transport.writes[0].startswith(b"HTTP/1.1 500 ")
        protocol.connection_lost(None)
        # over uvicorn's `limit_concurrency` the front's own 503 answers, not the handler
        protocol, transport = _connect(App(), proxy_headers=False, limit_concurrency=1)
        protocol.data_received(b"POST /fails HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        await _until(lambda: transport.writes, "answered")
        assert transport.writes[0].startswith(b"HTTP/1.1 503 ")
        protocol.connection_lost(None)

    asyncio.run(main())


def test_the_gateway_server_serves_its_completion_paths_without_asgi():
    """The gateway's own uvicorn settings leave no middleware between our front and the app (proxy headers
    would add one), so its completion paths reach the direct handlers, not the slower ASGI path."""
    from inferstack.config import parse_config
    from inferstack.gateway.serve import server_config
    from inferstack.gateway.server import Gateway

    config = server_config(Gateway(parse_config("pools:\n  p:\n    endpoints: [http://127.0.0.1:9]\n")))
    config.load()

    async def direct_paths() -> set[bytes]:
        return set(config.http_protocol_class(config=config, server_state=ServerState(), app_state={}).direct)

    assert asyncio.run(direct_paths()) == {b"/v1/chat/completions", b"/v1/completions"}


class _DirectOnly:
    """An app whose every request is served by its ``direct_post`` handlers (never through ASGI)."""

    def __init__(self, handlers: dict) -> None:
        self.direct_post = handlers

    async def __call__(self, scope, receive, send) -> None:
        raise AssertionError("not through ASGI")


def test_fixed_headers_are_checked_once_and_sent_by_reply_direct_or_through_send():
    """`fixed_headers` checks as `send` does (a value that splits the head raises; a framing header is refused)
    and `Cycle.reply` sends them after the per-response headers, on the direct path and when it falls back to
    `send` (a reply after a paused write)."""
    import pytest

    from inferstack.protocol.http_cycle import fixed_headers

    with pytest.raises(RuntimeError):
        fixed_headers([(b"x-bad", b"a\r\nset-cookie: x")])
    with pytest.raises(ValueError):
        fixed_headers([(b"Content-Length", b"2")])
    fixed = fixed_headers([(b"Content-Type", b"application/json"), (b"x-served", b"engine-1")])
    assert fixed.pairs == ((b"content-type", b"application/json"), (b"x-served", b"engine-1"))

    async def direct(cycle) -> None:
        cycle.body_now()
        await cycle.reply(200, [(b"content-length", b"2")], b"ok", fixed)

    async def main():
        protocol, transport = _connect(_DirectOnly({b"/d": direct}), proxy_headers=False)
        protocol.data_received(b"POST /d HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        await _until(lambda: len(transport.writes) == 1, "answered directly")
        protocol.pause_writing()  # the reply goes through `send`, which waits for the drain
        protocol.data_received(b"POST /d HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        await asyncio.sleep(0)
        protocol.resume_writing()
        await _until(lambda: len(transport.writes) == 2, "answered through send")
        protocol.connection_lost(None)
        return transport.writes

    for written in asyncio.run(main()):
        assert b"\r\ncontent-length: 2\r\ncontent-type: application/json\r\nx-served: engine-1\r\n\r\nok" in written


def test_write_now_streams_chunks_without_messages_until_writes_pause():
    """`Cycle.write_now` writes a started response's next chunk as `send` would (chunked framing, the head with the
    first bytes); False before the response starts or while the client's writes are paused (then `send`, which
    waits for the drain), and after the client left it writes nothing."""
    results: list[bool] = []

    async def stream(cycle) -> None:
        cycle.body_now()
        results.append(cycle.write_now(b"too early"))
        await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/x")]})
        results.append(cycle.write_now(b"data: 1\n\n"))
        cycle.proto.pause_writing()
        results.append(cycle.write_now(b"data: 2\n\n"))
        cycle.proto.resume_writing()
        results.append(cycle.write_now(b"data: 2\n\n"))
        await cycle.send({"type": "http.response.body", "body": b""})

    async def main():
        protocol, transport = _connect(_DirectOnly({b"/s": stream}), proxy_headers=False)
        protocol.data_received(b"POST /s HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        await _until(lambda: len(results) == 4 and transport.writes and transport.writes[-1].endswith(b"0\r\n\r\n"),
                     "streamed")
        protocol.connection_lost(None)
        return b"".join(transport.writes)

    written = asyncio.run(main())
    assert results == [False, True, False, True]
    assert written.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked\r\n" in written
    assert written.endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n")
