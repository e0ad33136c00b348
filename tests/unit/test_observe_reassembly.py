"""HTTP/1.1 + SSE reassembly of `inferstack observe` from recorded syscall byte streams: split at every
boundary, captured prefixes cut short, interleaved connections, keep-alive reuse, chunked encoding."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.observe.events import Accept, Close, Decoder, Segment, unescape
from inferstack.observe.exchange import ObservedRequest
from inferstack.observe.program import PIECE
from inferstack.observe.tracker import Reorder, Tracker

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
TOKENS = [" The", " quick", " brown", " fox", " jumps"]


def _chunk(obj: dict | str) -> bytes:
    return b"data: " + (obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()) + b"\n\n"


def sse_events(n_tokens: int = 5, usage: bool = True) -> list[bytes]:
    """What our engine writes for a chat stream: a role chunk (no content), one chunk per token, a
    usage chunk, [DONE] (as recorded from `inferstack engine serve --emulate`)."""
    head = {"id": "chatcmpl-eca73089df804c9cae1bdcdc63e0b8d1-7dbf6d40", "object": "chat.completion.chunk",
            "created": 1796523897, "model": MODEL}

    def choice(delta: dict) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
                "usage": None}

    out = [_chunk(choice({"role": "assistant", "content": ""}))]
    out += [_chunk(choice({"content": TOKENS[i % len(TOKENS)]})) for i in range(n_tokens)]
    if usage:
        out.append(_chunk({**head, "choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": n_tokens,
                                                            "total_tokens": 31 + n_tokens,
                                                            "prompt_tokens_details": {"cached_tokens": 16}}}))
    return [*out, _chunk("[DONE]")]


def request_bytes(path: str = "/v1/chat/completions", prompt: str = "hi") -> bytes:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}).encode()
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


RESPONSE_HEAD = (b"HTTP/1.1 200 OK\r\ndate: Sun, 06 Dec 2026 02:00:00 GMT\r\ncontent-type: text/event-stream; "
                 b"charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")


def chunked_writes(events: list[bytes]) -> list[bytes]:
    """One write per event in chunked framing, then the last chunk: what uvicorn/h11 send."""
    return [RESPONSE_HEAD] + [b"%x\r\n%s\r\n" % (len(e), e) for e in events] + [b"0\r\n\r\n"]


def content_ends(writes: list[bytes]) -> list[int]:
    """Stream offsets of the last byte of every content event's terminator."""
    ends, off = [], 0
    for w in writes:
        i = w.find(b"\n\n")
        if i >= 0 and b'"content": "' in w and b'"content": ""' not in w:
            ends.append(off + i + 1)
        off += len(w)
    return ends


class Run:
    def __init__(self, **kw: object) -> None:
        self.done: list[ObservedRequest] = []
        self.tracker = Tracker(self.done.append, **kw)  # type: ignore[arg-type]

    def seg(self, ts: int, inbound: bool, data: bytes, total: int | None = None, fd: int = 7, wire: int = 0) -> None:
        self.tracker.handle(Segment(ts, 100, fd, inbound, len(data) if total is None else total, data, wire))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _feed_split(cuts: list[int]) -> tuple[ObservedRequest, list[int]]:
    """Request at ts 1, response split at `cuts`; segment k of the response is written at ts 1000 + k."""
    writes = chunked_writes(sse_events())
    stream = b"".join(writes)
    run = Run()
    run.tracker.handle(Accept(0, 100, 7))
    run.seg(1, True, request_bytes())
    pieces = _split(stream, cuts)
    starts = [0]
    for k, p in enumerate(pieces):
        run.seg(1000 + k, False, p)
        starts.append(starts[-1] + len(p))
    assert len(run.done) == 1, "the response did not end"
    expect = [1000 + max(k for k, s in enumerate(starts[:-1]) if s <= off) for off in content_ends(writes)]
    return run.done[0], expect


def test_a_stream_split_at_every_single_boundary_gives_the_same_exchange() -> None:
    stream_len = len(b"".join(chunked_writes(sse_events())))
    for cut in range(1, stream_len):
        req, expect = _feed_split([cut])
        assert (req.status_code, req.streamed, req.model, req.error) == (200, True, MODEL, ""), cut
        assert (req.prompt_tokens, req.completion_tokens, req.cached_tokens) == (31, 5, 16), cut
        assert req.chunk_ns == expect, cut
        assert req.arrival_ns == 1 and req.first_byte_ns == 1000 and req.end_ns == 1001


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2000), max_size=40))
def test_a_stream_split_anywhere_keeps_every_chunk_time(cuts: list[int]) -> None:
    stream_len = len(b"".join(chunked_writes(sse_events())))
    req, expect = _feed_split([c for c in cuts if c < stream_len])
    assert req.chunk_ns == expect and len(expect) == 5
    assert req.completion_tokens == 5 and req.output_tokens == 5 and req.error == ""


@settings(max_examples=60, deadline=None)
@given(cap=st.integers(min_value=len(RESPONSE_HEAD), max_value=700), n=st.integers(min_value=1, max_value=12))
def test_captured_prefixes_cut_short_keep_framing_and_event_count(cap: int, n: int) -> None:
    """Only `cap` bytes of each write are seen (at least the head): chunk sizes still say where every
    event is."""
    writes = chunked_writes(sse_events(n))
    run = Run()
    run.tracker.handle(Accept(0, 100, 7))
    run.seg(1, True, request_bytes())
    for k, w in enumerate(writes):
        run.seg(10 + k, False, w[:cap], len(w))
    req = run.done[0]
    assert req.error == "" and req.status_code == 200
    assert req.events == n + 3                  # role, n tokens, usage, [DONE]
    assert req.end_ns == 10 + len(writes) - 1
    if cap >= max(len(w) for w in writes):
        assert req.uncertain_events == 0 and req.chunk_ns == [10 + 2 + i for i in range(n)]
        assert req.completion_tokens == n
    else:
        # events timed at their own write; content counted from what the prefix shows
        assert all(10 + 1 <= t <= 10 + n + 2 for t in req.chunk_ns)
        assert n <= len(req.chunk_ns) <= n + 2


def test_keep_alive_reuse_and_interleaved_connections() -> None:
    run = Run()
    for fd in (7, 8):
        run.tracker.handle(Accept(0, 100, fd))
    a, b = chunked_writes(sse_events(3)), chunked_writes(sse_events(4))
    # two requests on fd 7 (keep-alive), one on fd 8, their writes interleaved in time
    run.seg(1, True, request_bytes(), fd=7)
    run.seg(2, True, request_bytes(path="/v1/completions"), fd=8)
    for k in range(max(len(a), len(b))):
        if k < len(a):
            run.seg(10 + 2 * k, False, a[k], fd=7)
        if k < len(b):
            run.seg(11 + 2 * k, False, b[k], fd=8)
    run.seg(100, True, request_bytes(prompt="again"), fd=7)
    for k, w in enumerate(a):
        run.seg(200 + k, False, w, fd=7)
    run.tracker.handle(Close(300, 100, 7))
    run.tracker.handle(Close(300, 100, 8))
    by = [(r.fd, r.arrival_ns, r.path, r.completion_tokens, len(r.chunk_ns), r.error) for r in run.done]
    assert sorted(by) == [(7, 1, "/v1/chat/completions", 3, 3, ""), (7, 100, "/v1/chat/completions", 3, 3, ""),
                          (8, 2, "/v1/completions", 4, 4, "")]
    second = next(r for r in run.done if r.arrival_ns == 100)
    assert second.chunk_ns == [202, 203, 204] and second.first_byte_ns == 200


def test_content_length_response_usage_and_counting_chunks_without_usage() -> None:
    body = json.dumps({"id": "x", "model": MODEL, "choices": [{"index": 0, "message": {"content": "hello"}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 7}}).encode()
    run = Run()
    run.tracker.handle(Accept(0, 100, 7))
    run.seg(1, True, request_bytes())
    run.seg(5, False, b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(body) + body[:30])
    run.seg(6, False, body[30:])
    run.seg(7, True, request_bytes())
    for k, w in enumerate(chunked_writes(sse_events(4, usage=False))):
        run.seg(10 + k, False, w)
    plain, streamed = run.done
    assert (plain.streamed, plain.completion_tokens, plain.prompt_tokens, plain.end_ns) == (False, 7, 3, 6)
    assert (streamed.completion_tokens, streamed.output_tokens, streamed.chunk_ns) == (None, 4, [12, 13, 14, 15])


def test_error_status_tls_and_a_connection_joined_mid_stream() -> None:
    tls = []
    run = Run(on_tls=lambda pid, fd: tls.append(fd))
    run.tracker.handle(Accept(0, 100, 7))
    run.seg(1, True, request_bytes())
    run.seg(2, False, b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    # fd 9 was open before we attached: its first bytes are the tail of a response, then a new exchange
    run.seg(3, False, b"d\r\ndata: partial\n\n\r\n", fd=9)
    run.seg(4, True, request_bytes(), fd=9)
    for k, w in enumerate(chunked_writes(sse_events(2))):
        run.seg(5 + k, False, w, fd=9)
    run.tracker.handle(Accept(20, 100, 8))
    run.seg(21, True, bytes.fromhex("160301020001") + b"\x00" * 50, fd=8)
    assert [(r.fd, r.status_code, len(r.chunk_ns)) for r in run.done] == [(7, 400, 0), (9, 200, 2)]
    assert tls == [8] and run.tracker.counters.tls_connections == 1


def test_unfinished_requests_end_with_a_reason() -> None:
    run = Run()
    run.tracker.handle(Accept(0, 100, 7))
    run.seg(1, True, request_bytes())
    writes = chunked_writes(sse_events(3))
    for k, w in enumerate(writes[:3]):
        run.seg(10 + k, False, w)
    run.tracker.finish()
    (req,) = run.done
    assert req.error == "still running when observation ended" and req.chunk_ns == [12]


def test_decoder_joins_pieces_across_cpus_and_reorders() -> None:
    dec = Decoder(capture_bytes=3 * PIECE)
    payload = b"HTTP/1.1 200 OK\r\n" + bytes(range(256)) + b"x" * 300
    pieces = [payload[:PIECE], payload[PIECE:2 * PIECE], payload[2 * PIECE:3 * PIECE]]
    enc = ["".join(chr(c) if 32 <= c < 127 else f"\\x{c:02x}" for c in p) for p in pieces]
    lines = [{"type": "printf", "data": f"D 50 100 3 7 1 0 {len(payload)} 2 {enc[2]}\n"},   # out of order
             {"type": "printf", "data": f"D 50 100 3 7 1 0 {len(payload)} 0 {enc[0]}\n"},
             {"type": "lost_events", "data": {"events": 4}},
             {"type": "printf", "data": "W 4 45\n"},
             {"type": "printf", "data": "D 60 100 4 8 0 0 5 0 GET /\n"},
             {"type": "printf", "data": f"D 50 100 3 7 1 0 {len(payload)} 1 {enc[1]}\n"},
             {"type": "printf", "data": "G 70 100 3 7 1 6 900\n"}]
    out = [e for ln in lines for e in dec.line(json.dumps(ln).encode())]
    read, seg, gap = out[1], out[2], out[3]
    assert isinstance(seg, Segment) and seg.data == payload[:3 * PIECE] and seg.total == len(payload)
    assert (seg.ts_ns, seg.pid, seg.fd, seg.inbound) == (50, 100, 7, False) and dec.lost == 4
    assert read == Segment(60, 100, 8, True, 5, b"GET /", wire_ns=45)
    assert gap == Segment(70, 100, 7, False, 900, b"")
    assert unescape("a\\x0d\\x0ab") == b"a\r\nb"
    r = Reorder(lag_ns=10)
    got = [e.ts_ns for ts in (5, 3, 20, 12, 40) for e in r.push(Accept(ts, 1, ts))] + [e.ts_ns for e in r.drain()]
    assert got == [3, 5, 12, 20, 40]


def test_arrival_is_the_wire_time_when_known_and_pipelined_requests_their_read() -> None:
    run = Run()
    run.tracker.handle(Accept(0, 100, 7))
    run.seg(50, True, request_bytes() + request_bytes(prompt="second"), wire=20)   # read 30 ns after arrival
    for k, w in enumerate(chunked_writes(sse_events(2)) + chunked_writes(sse_events(2))):
        run.seg(100 + k, False, w)
    first, second = run.done
    assert (first.arrival_ns, first.read_ns) == (20, 50)
    assert (second.arrival_ns, second.read_ns) == (50, 50)
    run.seg(300, True, request_bytes(), wire=400)        # a wire time after the read is not believed
    assert run.tracker.conns[(100, 7)].pending[-1].arrival_ns == 300


def test_a_stream_whose_last_chunk_was_not_seen_ends_at_done() -> None:
    """hyper writes several chunks in one writev; iovecs past the captured ones are unseen bytes."""
    run = Run()
    run.tracker.handle(Accept(0, 100, 7))
    for n, base in ((3, 0), (2, 100)):
        run.seg(base + 1, True, request_bytes())
        writes = chunked_writes(sse_events(n))
        for k, w in enumerate(writes[:-1]):
            run.seg(base + 10 + k, False, w)
        run.seg(base + 50, False, b"", total=len(writes[-1]))      # "0\r\n\r\n" in an unseen iovec
    run.tracker.handle(Close(300, 100, 7))
    assert [(r.error, r.end_ns, len(r.chunk_ns)) for r in run.done] == [("", 16, 3), ("", 115, 2)]


def test_response_bytes_that_are_not_a_status_line_desync_instead_of_failing() -> None:
    """After dropped perf records a connection can sit IDLE in the middle of a response: the bytes that
    follow end a "head" that is no status line. They are dropped as a desync; the next exchange parses."""
    run = Run()
    run.tracker.handle(Accept(0, 100, 7))
    run.seg(1, True, request_bytes())
    run.seg(2, False, b"data: [DONE]\r\n\r\n")
    run.seg(3, False, b"0\r\n\r\n")
    run.seg(4, True, request_bytes())
    for k, w in enumerate(chunked_writes(sse_events(2))):
        run.seg(5 + k, False, w)
    assert [(r.status_code, len(r.chunk_ns)) for r in run.done][-1] == (200, 2)
    assert run.tracker.desyncs >= 1
