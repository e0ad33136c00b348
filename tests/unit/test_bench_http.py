"""The bench's HTTP/1.1 response parser: any split of the byte stream gives the same response."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.bench.http import HTTPFailure, Response, _Exchange


def _chunked(events: list[bytes]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    return head + body + b"0\r\n\r\n"


def _feed(raw: bytes, cuts: list[int], stream: bool) -> Response:
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        ex = _Exchange(fut, stream)
        points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
        for i, (a, b) in enumerate(itertools.pairwise(points)):
            ex.feed(raw[a:b], float(i))
        assert fut.done(), "the response never completed"
        return fut.result()
    finally:
        loop.close()


events_st = st.lists(st.binary(min_size=1, max_size=30).map(
    lambda b: b"data: " + b.replace(b"\n", b"_").replace(b"\r", b"_") + b"\n\n"), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(events_st, st.lists(st.integers(0, 10_000), max_size=12))
def test_chunked_sse_lines_survive_any_split(events: list[bytes], cuts: list[int]) -> None:
    resp = _feed(_chunked(events), cuts, stream=True)
    assert resp.status == 200
    assert [line for _, line in resp.lines] == [e.rstrip(b"\n") for e in events]
    times = [t for t, _ in resp.lines]
    assert times == sorted(times)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 10_000), max_size=8))
def test_content_length_body_survives_any_split(body: bytes, cuts: list[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(body), body)
    resp = _feed(raw, cuts, stream=False)
    assert resp.body == body


def test_error_status_keeps_the_body_for_the_message() -> None:
    body = b'{"error":{"message":"nope"}}'
    raw = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    resp = _feed(raw, [5, 40], stream=True)
    assert resp.status == 429 and resp.body == body and not resp.lines


def test_bad_status_line_is_a_bad_response() -> None:
    loop = asyncio.new_event_loop()
    try:
        ex = _Exchange(loop.create_future(), False)
        try:
            ex.feed(b"garbage\r\n\r\n", 0.0)
        except HTTPFailure as e:
            assert e.kind == "bad_response"
        else:
            raise AssertionError("no failure")
    finally:
        loop.close()
