"""StreamMeter: SSE usage and timing read the same however a proxy re-cuts the stream."""

from __future__ import annotations

from inferstack.gateway.pipeline.usage import StreamMeter

EVENTS = [
    b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n',
    b"data: [DONE]\n\n",
]
STREAM = b"".join(EVENTS)


def _run(cuts: list[int], strip: bool) -> tuple[StreamMeter, bytes]:
    meter = StreamMeter(t0=0.0, strip=strip)
    out, prev = [], 0
    for i, cut in enumerate([*cuts, len(STREAM)]):
        out.append(meter.feed(STREAM[prev:cut], now=float(i + 1)))
        prev = cut
    out.append(meter.flush())
    return meter, b"".join(out)


def test_usage_split_across_chunks_is_read_and_stripped():
    split_usage = STREAM.index(b'"usage"') + 5
    for cuts in ([], [len(EVENTS[0]), split_usage], list(range(1, len(STREAM), 7))):
        meter, forwarded = _run(cuts, strip=True)
        assert meter.usage == {"prompt_tokens": 7, "completion_tokens": 2}, cuts
        assert forwarded == STREAM.replace(EVENTS[3], b""), cuts


def test_partial_events_wait_and_an_unterminated_tail_is_flushed():
    meter = StreamMeter(t0=0.0, strip=False)
    assert meter.feed(EVENTS[1][:10], now=1.0) == b""  # half an event: nothing forwarded, no TTFT yet
    assert meter.ttft is None
    assert meter.feed(EVENTS[1][10:] + b"data: {", now=2.0) == EVENTS[1]
    assert meter.ttft == 2.0 and meter.events == 1
    assert meter.flush() == b"data: {"


def test_ttft_is_the_first_content_even_in_a_chunk_coalesced_with_the_role_event():
    meter = StreamMeter(t0=0.0, strip=False)
    meter.feed(EVENTS[0] + EVENTS[1], now=3.0)
    assert meter.ttft == 3.0
    completions = StreamMeter(t0=0.0, strip=False)
    completions.feed(b'data: {"choices":[{"text":""}]}\n\n', now=1.0)
    completions.feed(b'data: {"choices":[{"text":" The"}]}\n\n', now=2.0)
    assert completions.ttft == 2.0
