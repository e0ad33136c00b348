"""Idle keep-alive connections outlast the clients' pool expiry, on the engine and on the gateway.

At uvicorn's default (5 s, the same as httpx's pool expiry) a client that reused a connection at the moment
the server closed it got "server disconnected" for a request that never ran (seen as a flaky OpenAI SDK test
with ``max_retries=0``). The servers now keep idle connections for `KEEP_ALIVE_S`."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from inferstack.protocol.http_limits import KEEP_ALIVE_S
from support.gateway_procs import start_gateway
from support.procs import Server, start_inferstack

PROFILE = "h100:llama-3-8b"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Server, Server]]:
    engine = start_inferstack(["engine", "serve", "--emulate", PROFILE])
    gateway = start_gateway({"pools": {"emulated": {"endpoints": [engine.url]}}})
    yield engine, gateway
    gateway.stop()
    engine.stop()


def _get(sock: socket.socket, host: str, path: str) -> bytes:
    """One GET on ``sock``; the whole response (both servers answer with a content-length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"{host} closed the connection: {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail(f"{host} closed the connection mid-body")
    return head.split(b"\r\n")[0]


def test_idle_connections_outlast_the_clients_pool_expiry(servers: tuple[Server, Server]) -> None:
    expiry = httpx.Limits().keepalive_expiry      # what the OpenAI SDKs' pool uses
    assert expiry is not None and 3 * expiry < KEEP_ALIVE_S
    socks = {}
    for server in servers:
        url = urlsplit(server.url)
        sock = socket.create_connection((url.hostname, url.port), timeout=10)
        assert _get(sock, url.netloc, "/v1/models").endswith(b" 200 OK")
        socks[sock] = url.netloc
    # a server closing an idle connection makes it readable (EOF): wait past the clients' expiry for that
    readable, _, _ = select.select(list(socks), [], [], expiry + 1.5)
    assert not readable, "a server closed an idle keep-alive connection within the clients' pool expiry"
    for sock, host in socks.items():
        assert _get(sock, host, "/v1/models").endswith(b" 200 OK")
        sock.close()
