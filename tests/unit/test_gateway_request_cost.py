"""The pieces that keep the gateway's per-request cost down (docs/gateway.md, "What a request costs"):
the client-gone future our HTTP protocol hands each request, the one-timer body deadline, the
garbage-collector settings of the server process and the per-endpoint request head."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import uvicorn

from inferstack.gateway.datalayer import Endpoint
from inferstack.gateway.upstream import UpstreamPool
from inferstack.protocol.errors import APIError
from inferstack.protocol.http_guard import CLIENT_GONE, guarded_protocol, read_asgi_body
from support.fake_transport import SocketlessTransport


def _receive_from(messages: list[dict], then: asyncio.Future | None = None):
    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        return await (then or asyncio.get_running_loop().create_future())
    return receive


@contextlib.asynccontextmanager
async def _serving(app, protocol) -> AsyncIterator[int]:
    """A real uvicorn server with ``protocol`` on a free loopback port, started (polled) and stopped."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = asyncio.get_running_loop().time() + 10.0
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline and not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


def test_body_read_from_receive_joins_chunks_and_enforces_limit_deadline_and_disconnect():
    async def main():
        chunks = [{"type": "http.request", "body": b"ab", "more_body": True},
                  {"type": "http.request", "body": b"cd", "more_body": False}]
        assert await read_asgi_body(_receive_from(list(chunks)), 10, 1.0) == b"abcd"
        with pytest.raises(APIError) as big:
            await read_asgi_body(_receive_from(list(chunks)), 3, 1.0)
        assert big.value.status == 413
        with pytest.raises(APIError) as slow:  # the first chunk came, the rest never does
            await read_asgi_body(_receive_from(chunks[:1]), 10, 0.05)
        assert slow.value.status == 408 and slow.value.code == "body_timeout"
        assert asyncio.current_task().cancelling() == 0  # the deadline took its cancellation back
        with pytest.raises(APIError) as gone:
            await read_asgi_body(_receive_from([{"type": "http.disconnect"}]), 10, 1.0)
        assert gone.value.status == 499

        # a cancellation from elsewhere (the server shutting down) is not mistaken for the deadline
        blocked = asyncio.Event()

        async def never() -> dict:
            blocked.set()
            return await asyncio.get_running_loop().create_future()

        reader = asyncio.ensure_future(read_asgi_body(never, 10, 5.0))
        await asyncio.wait_for(blocked.wait(), 5.0)  # the reader is inside receive(): cancel it there
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(main())


def test_client_gone_future_completes_only_for_a_client_that_left_before_its_response():
    """A real uvicorn server with our protocol: one client waits for its answer, one hangs up early."""
    seen: dict[bytes, asyncio.Future] = {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        gone = scope["extensions"][CLIENT_GONE]
        seen[scope["raw_path"]] = gone
        if scope["raw_path"] == b"/slow":
            await asyncio.wait([gone], timeout=5.0)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        async with _serving(app, guarded_protocol()) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
            writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")  # same connection, then hang up
            deadline = asyncio.get_running_loop().time() + 5.0
            while b"/slow" not in seen:
                assert asyncio.get_running_loop().time() < deadline, "the /slow request never reached the app"
                await asyncio.sleep(0.01)
            writer.close()
            await asyncio.wait_for(seen[b"/slow"], 5.0)  # completes once the connection is lost
            assert not seen[b"/fast"].done()  # answered before the hang-up: never completes

    asyncio.run(main())


def test_served_gateway_process_freezes_startup_heap_and_raises_gen0_threshold():
    code = ("import gc; from inferstack.gateway.serve import GC_GEN0_THRESHOLD, tune_gc; tune_gc(); "
            "assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD > 700, gc.get_threshold(); "
            "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_endpoint_request_head_is_built_once_per_path_and_carries_the_request_id():
    ep = Endpoint("http://127.0.0.1:9/", "e1", "sk-up", None, None)
    ep.upstream = UpstreamPool(ep.url, 1.0, 1.0)
    first = ep.post_head(b"/v1/chat/completions", b"rid-1")
    assert first == (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:9\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer sk-up\r\nx-request-id: rid-1\r\n")
    assert ep.post_head(b"/v1/chat/completions", b"rid-2").endswith(b"x-request-id: rid-2\r\n")
    assert ep.post_head(b"/v1/completions", b"r").startswith(b"POST /v1/completions HTTP/1.1\r\n")


def test_response_head_leaves_with_the_body_in_one_write_and_a_stream_head_at_the_next_loop_step():
    """The front holds a response head until the first body bytes (one write per response); a stream's head
    leaves at the next event-loop step when no body joins it; an interim 100 Continue is never held."""
    from uvicorn.server import ServerState

    stream_go = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        if scope["path"] == "/whole":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await stream_go.wait()  # the first token is not there yet
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def until(transport, n: int) -> None:
        deadline = asyncio.get_running_loop().time() + 5.0
        while len(transport.writes) < n:
            assert asyncio.get_running_loop().time() < deadline, transport.writes
            await asyncio.sleep(0.005)

    async def main():
        config = uvicorn.Config(app, lifespan="off", log_level="warning")
        protocol = guarded_protocol()(config=config, server_state=ServerState(), app_state={})
        transport = SocketlessTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"POST /whole HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
        await until(transport, 1)
        assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]

        protocol.data_received(b"POST /stream HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        await until(transport, 2)  # the head alone, before any token
        assert transport.writes[1] == (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                       b"transfer-encoding: chunked\r\n\r\n")
        stream_go.set()
        await until(transport, 4)
        assert transport.writes[2:] == [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"]

        protocol.data_received(b"POST /whole HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                               b"content-length: 2\r\n\r\n")
        await until(transport, 5)
        assert transport.writes[4] == b"HTTP/1.1 100 Continue\r\n\r\n"
        protocol.data_received(b"hi")
        await until(transport, 6)
        assert transport.writes[5] == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        protocol.connection_lost(None)

    asyncio.run(main())


def test_a_later_keep_alive_request_whose_headers_stall_is_cut_off():
    """The header deadline is armed only when a header block does not arrive whole in one read; a later
    request on a keep-alive connection that stalls in its headers still gets its 408."""
    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        async with _serving(app, guarded_protocol(header_timeout_s=0.5)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):  # whole header blocks, answered; the deadline never fires in between
                writer.write(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
                assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5.0)).startswith(b"HTTP/1.1 200")
                await asyncio.sleep(0.6)  # longer than the header timeout: idle keep-alive is not cut
            t0 = asyncio.get_running_loop().time()
            writer.write(b"GET /b HTTP/1.1\r\nhost: x\r\n")  # headers that never end
            rest = await asyncio.wait_for(reader.read(), 5.0)
            assert rest.startswith(b"HTTP/1.1 408") and b"header_timeout" in rest, rest
            assert asyncio.get_running_loop().time() - t0 >= 0.45
            writer.close()

    asyncio.run(main())


def test_request_ids_are_distinct_version4_uuids_across_refills():
    import uuid

    from inferstack.gateway.pipeline.context import RequestIds

    ids = RequestIds()
    got = [ids.new() for _ in range(600)]  # past two 256-id refills
    assert len(set(got)) == 600
    for rid in got:
        u = uuid.UUID(hex=rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and u.hex == rid


def test_a_later_keep_alive_header_block_arriving_in_one_read_is_metered_from_its_first_byte():
    """The header cap holds for a later request on a keep-alive connection even when its whole oversized
    header block arrives in a single read (before, only the bytes after that read were counted)."""
    from uvicorn.server import ServerState

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        config = uvicorn.Config(app, lifespan="off", log_level="warning")
        protocol = guarded_protocol(max_header_bytes=4096)(config=config, server_state=ServerState(), app_state={})
        transport = SocketlessTransport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        deadline = asyncio.get_running_loop().time() + 5.0
        while not any(b"ok" in w for w in transport.writes):
            assert asyncio.get_running_loop().time() < deadline, transport.writes
            await asyncio.sleep(0.01)
        assert transport.writes[0].startswith(b"HTTP/1.1 200")
        protocol.data_received(b"GET /b HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 8192 + b"\r\n\r\n")
        assert transport.writes[-1].startswith(b"HTTP/1.1 431") and b"headers_too_large" in transport.writes[-1]
        protocol.connection_lost(None)

    asyncio.run(main())
