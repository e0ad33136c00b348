"""The lean upstream HTTP/1.1 client against a raw asyncio server (bytes on the wire are ours)."""

from __future__ import annotations

import asyncio

import pytest

from inferstack.gateway.upstream import UpstreamError, UpstreamPool, finished


async def _serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


async def _requests(reader: asyncio.StreamReader):
    """Each request on a connection until the client closes it."""
    while True:
        try:
            yield await _read_request(reader)
        except asyncio.IncompleteReadError:
            return


def test_content_length_chunked_keepalive_and_reconnect():
    async def main():
        conns = 0

        async def handler(reader, writer):
            nonlocal conns
            conns += 1
            while True:
                try:
                    head, body = await _read_request(reader)
                except asyncio.IncompleteReadError:
                    break
                if b"/chunked" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    for part in (b"data: 1\n\n", b"data: 2\n\n"):
                        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                        await writer.drain()
                        await asyncio.sleep(0.01)
                    writer.write(b"0\r\n\r\n")
                elif b"/close-after" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
                    writer.close()  # server drops the idle keep-alive connection
                    return
                else:
                    writer.write(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
            writer.close()

        server, url = await _serve(handler)
        pool = UpstreamPool(url, 1.0, 2.0)
        for i in range(3):
            conn = await pool.request(b"POST", b"/echo", [(b"x-request-id", b"r")], b'{"i": %d}' % i)
            assert conn.status == 201 and conn.content_type == b"application/json"
            assert await conn.read() == b'{"i": %d}' % i
            conn.release()
        assert conns == 1  # keep-alive reuse
        conn = await pool.request(b"POST", b"/chunked", [], b"{}")
        chunks = []
        while (c := await conn.next_chunk()) is not None:
            chunks.append(c)
        conn.release()
        assert b"".join(chunks) == b"data: 1\n\ndata: 2\n\n"
        conn = await pool.request(b"GET", b"/close-after", [], b"")
        assert await conn.read() == b"ok"
        conn.release()
        await asyncio.sleep(0.05)
        # the pooled connection was closed by the server: the next request reconnects transparently
        conn = await pool.request(b"POST", b"/echo", [], b"again")
        assert await conn.read() == b"again"
        conn.release()
        pool.close()
        server.close()

    asyncio.run(main())


def test_errors_timeouts_and_refused():
    async def main():
        async def handler(reader, writer):
            head, _ = await _read_request(reader)
            if b"/hang" in head:
                await asyncio.sleep(5)
            elif b"/garbage" in head:
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            elif b"/cut" in head:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                await writer.drain()
            writer.close()

        server, url = await _serve(handler)
        pool = UpstreamPool(url, 1.0, 0.2)
        with pytest.raises(UpstreamError, match="no data"):
            await pool.request(b"POST", b"/hang", [], b"")
        with pytest.raises(UpstreamError, match="malformed"):
            await pool.request(b"POST", b"/garbage", [], b"")
        conn = await pool.request(b"POST", b"/cut", [], b"")
        with pytest.raises(UpstreamError, match="closed"):
            await conn.read()
        conn.close()
        server.close()
        await server.wait_closed()
        dead = UpstreamPool(url, 1.0, 1.0)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await dead.request(b"POST", b"/x", [], b"")

    asyncio.run(main())


def test_a_connection_closed_before_the_request_is_sent_is_an_upstream_error():
    """A server that accepts and hangs up at once (an engine going down, or not HTTP at all): under
    uvloop the write used to raise RuntimeError, which no caller treats as a connection failure."""
    import uvloop

    async def main():
        async def handler(reader, writer):
            writer.close()

        server, url = await _serve(handler)
        pool = UpstreamPool(url, 2.0, 2.0)
        conn = await pool._connect()
        deadline = asyncio.get_running_loop().time() + 5
        while not conn.closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        with pytest.raises(UpstreamError, match="before the request was sent"):
            conn.send(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(UpstreamError):
            await pool.request(b"GET", b"/metrics", [], b"")
        pool.close()
        server.close()

    uvloop.run(main())


def test_read_timeout_counts_from_the_last_bytes_not_from_the_request():
    """One timer per request: bytes keep arriving for longer than the timeout and the response is read;
    when they stop, the request fails after the timeout."""
    async def main():
        async def handler(reader, writer):
            while True:  # every request of the keep-alive connection
                try:
                    head, _ = await _read_request(reader)
                except asyncio.IncompleteReadError:
                    break
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for _ in range(10):  # 1 s of bytes, every 0.1 s, against a 0.4 s read timeout
                    writer.write(b"1\r\nx\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.1)
                if b"/stall" in head:
                    await asyncio.sleep(30)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            writer.close()

        server, url = await _serve(handler)
        pool = UpstreamPool(url, 1.0, 0.4)
        conn = await pool.request(b"POST", b"/trickle", [], b"")
        assert await conn.read() == b"x" * 10
        conn.release()
        conn = await pool.request(b"POST", b"/stall", [], b"")
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamError, match="no data"):
            await conn.read()
        assert asyncio.get_running_loop().time() - t0 >= 1.0  # after the trickle (a timer from the request: 0.4 s)
        conn.close()
        server.close()

    asyncio.run(main())


def test_the_read_timer_outlives_a_response_and_never_closes_an_idle_pooled_connection():
    """One read timer per connection, kept armed across requests: when it fires on an idle pooled connection
    it leaves the connection alone (it is reused, one server connection), and a later stalled request on the
    same connection still fails after the timeout counted from its own request."""
    async def main():
        conns = 0

        async def handler(reader, writer):
            nonlocal conns
            conns += 1
            while True:
                try:
                    head, _ = await _read_request(reader)
                except asyncio.IncompleteReadError:
                    break
                if b"/stall" in head:  # the head, then nothing
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
                    await writer.drain()
                    await asyncio.sleep(30)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
            writer.close()

        server, url = await _serve(handler)
        loop = asyncio.get_running_loop()
        pool = UpstreamPool(url, 1.0, 0.2)
        conn = await pool.request(b"POST", b"/a", [], b"")
        assert await conn.read() == b"ok"
        conn.release()
        first = conn
        deadline = loop.time() + 10
        while first._read_timer is not None:  # poll until the timer has fired on the idle connection
            assert loop.time() < deadline, "the read timer never fired"
            await asyncio.sleep(0.01)
        assert not first.closed
        conn = await pool.request(b"POST", b"/b", [], b"")
        assert conn is first and await conn.read() == b"ok"
        conn.release()
        conn = await pool.request(b"POST", b"/stall", [], b"")
        t0 = loop.time()
        with pytest.raises(UpstreamError, match="no data"):
            await conn.read()
        waited = loop.time() - t0
        assert conn is first and 0.15 <= waited < 2.0, waited
        assert conns == 1
        conn.close()
        pool.close()
        server.close()

    asyncio.run(main())


def test_a_request_that_times_out_on_a_reused_connection_is_not_sent_again():
    """A hung engine on a keep-alive connection: the request fails after one read timeout and reaches the
    engine once (it was sent again on a fresh connection, running it twice and doubling the wait)."""
    async def main():
        seen: list[bytes] = []

        async def handler(reader, writer):
            while True:
                try:
                    head, _ = await _read_request(reader)
                except asyncio.IncompleteReadError:
                    break
                seen.append(head.split(b" ")[1])
                if b"/hang" in head:
                    await asyncio.sleep(30)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
            writer.close()

        server, url = await _serve(handler)
        pool = UpstreamPool(url, 1.0, 0.3)
        conn = await pool.request(b"POST", b"/ok", [], b"")
        assert await conn.read() == b"ok"
        conn.release()
        with pytest.raises(UpstreamError, match="no data"):
            await pool.request(b"POST", b"/hang", [], b"")
        assert seen == [b"/ok", b"/hang"]  # sent once: sent again, the engine ran it twice and the client waited twice
        pool.close()
        server.close()

    asyncio.run(main())


def test_sent_runs_once_before_the_first_suspension_on_a_kept_or_a_new_connection():
    """`send_request`'s ``sent`` (what the proxy puts off until its request is on its way: the routing record)
    runs exactly once: right after the write on a kept connection, before the connect of a new one, and once
    when a kept connection the server closed is replaced by a new one."""
    async def main():
        accepted = 0

        async def handler(reader, writer):
            nonlocal accepted
            accepted += 1
            async for head, body in _requests(reader):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if b"/close-after" in head:
                    writer.close()  # the kept connection dies while idle
                    return
            writer.close()

        server, url = await _serve(handler)
        pool = UpstreamPool(url, 1.0, 2.0)
        calls: list[tuple[int, bool]] = []  # (connections accepted so far, a kept connection was in the pool)

        async def one(path: bytes, body: bytes) -> None:
            kept = bool(pool._idle)
            conn = await pool.send_request(pool.head(b"POST", path, []), body,
                                           lambda: calls.append((accepted, kept)))
            assert await conn.read() == body
            conn.release()

        await one(b"/new", b"a")  # no kept connection: before connecting (nothing accepted yet)
        await one(b"/close-after", b"b")  # on the kept connection, right after the write
        assert calls == [(0, False), (1, True)]
        while not pool._idle[0].closed:  # the server's close reached the pooled connection
            await asyncio.sleep(0.01)
        await one(b"/again", b"c")  # the dead kept connection is skipped: once, before the new connect
        assert calls[2:] == [(1, True)] and accepted == 2
        pool.close()
        server.close()

    asyncio.run(main())


def test_send_now_on_kept_connections_and_finished_yields_answers_as_they_come_failures_included():
    """`send_now` writes on a kept connection with no wait (None with none kept); `finished` hands over several
    exchanges in one coroutine in the order they end, a failed one with its error, and no task is made for them."""
    async def main():
        release_slow = asyncio.Event()

        async def handler(reader, writer):
            async for head, _ in _requests(reader):
                if b"/slow" in head:
                    await release_slow.wait()
                elif b"/drop" in head:
                    writer.close()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n" + head.split(b" ")[1][1:3])
                await writer.drain()

        server, url = await _serve(handler)
        pools = [UpstreamPool(url, 5.0, 5.0) for _ in range(3)]
        try:
            assert pools[0].send_now(pools[0].head(b"GET", b"/fast", []), b"") is None  # nothing kept yet
            for p in pools:  # one kept connection each
                conn = await p.request(b"GET", b"/fast", [], b"")
                await conn.read()
                conn.release()
            tasks_before = len(asyncio.all_tasks())
            paths = (b"/slow", b"/fast", b"/drop")
            conns = [p.send_now(p.head(b"GET", path, []), b"") for p, path in zip(pools, paths, strict=True)]
            assert all(c is not None for c in conns) and len(asyncio.all_tasks()) == tasks_before
            order = []
            async for conn in finished(conns):
                order.append(conns.index(conn))
                if conn.error is None:
                    assert conn.body_now() == {0: b"sl", 1: b"fa"}[conns.index(conn)]
                    conn.release()
                else:
                    assert isinstance(conn.error, UpstreamError)
                    conn.close()
                if len(order) == 2:
                    release_slow.set()  # the slow one answers only after the others are in
            return order
        finally:
            for p in pools:
                p.close()
            server.close()

    order = asyncio.run(main())
    assert sorted(order[:2]) == [1, 2] and order[2] == 0
