"""The pieces that keep the gateway's per-request cost down (docs/gateway.md, "What a request costs"):
the client-gone future our HTTP protocol hands each request, the one-timer body deadline, the
garbage-collector settings of the server process and the per-endpoint request head."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest
import uvicorn

from inferstack.gateway.datalayer import Endpoint
from inferstack.gateway.upstream import UpstreamPool
from inferstack.protocol.errors import APIError
from inferstack.protocol.http_guard import CLIENT_GONE, guarded_protocol, read_asgi_body


def _receive_from(messages: list[dict], then: asyncio.Future | None = None):
    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        return await (then or asyncio.get_running_loop().create_future())
    return receive


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
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, http=guarded_protocol(), lifespan="off", log_level="warning"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            deadline = asyncio.get_running_loop().time() + 10.0
            while not server.started:
                assert asyncio.get_running_loop().time() < deadline and not task.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
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
        finally:
            server.should_exit = True
            await task

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
