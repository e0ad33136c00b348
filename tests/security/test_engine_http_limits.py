"""Replayed probes (issue 19, item 7, engine side) against a real `inferstack engine serve` process:
oversized headers, slowloris headers and a stalled body are cut off with an OpenAI envelope."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

from tests.support.procs import Server


def _connect(srv: Server) -> socket.socket:
    u = urlsplit(srv.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    return sock


def _response(sock: socket.socket) -> tuple[int, dict, float]:
    """Status, JSON body and the seconds until the server closed the connection."""
    t0 = time.monotonic()
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), time.monotonic() - t0


def test_a_one_megabyte_header_gets_431_and_a_closed_connection(engine: Server) -> None:
    with _connect(engine) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        status, body, _ = _response(sock)
    assert status == 431 and body["error"]["code"] == "headers_too_large"


def test_headers_just_under_the_cap_are_served(engine: Server) -> None:
    with _connect(engine) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 60_000
                     + b"\r\n\r\n")
        status, _, _ = _response(sock)
    assert status == 200


def test_slowloris_headers_are_cut_after_the_header_timeout(engine: Server) -> None:
    socks = [_connect(engine) for _ in range(5)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    time.sleep(0.5)
    for s in socks:
        s.sendall(b"X-a: b\r\n")  # a trickle of bytes does not extend the deadline
    for s in socks:
        with s:
            status, body, waited = _response(s)
            assert status == 408 and body["error"]["code"] == "header_timeout" and waited < 3


def test_a_stalled_body_gets_408(engine: Server) -> None:
    with _connect(engine) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        status, body, waited = _response(sock)
    assert status == 408 and body["error"]["code"] == "body_timeout" and waited < 3


def test_later_requests_on_a_keep_alive_connection_are_metered_too(engine: Server) -> None:
    with _connect(engine) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):   # /health answers a small JSON object
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (200 << 10) + b"\r\n\r\n")
        status, body, _ = _response(sock)
    assert status == 431 and body["error"]["code"] == "headers_too_large"
