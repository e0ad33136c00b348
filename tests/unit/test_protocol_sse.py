import orjson
from hypothesis import given
from hypothesis import strategies as st

from inferstack.protocol.sse import SSE_DONE, SSEDecoder, is_done, sse_event

payloads = st.lists(st.dictionaries(st.text(max_size=6), st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1),
                                    max_size=4),
                    min_size=1, max_size=6)


@given(payloads, st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20))
def test_decoder_reassembles_any_split(objs: list[dict], cuts: list[int]) -> None:
    stream = b"".join(sse_event(o) for o in objs) + SSE_DONE
    dec, got, pos, i = SSEDecoder(), [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got += dec.feed(stream[pos:pos + step])
        pos, i = pos + step, i + 1
    assert [orjson.loads(p) for p in got[:-1]] == objs
    assert is_done(got[-1])


def test_decoder_handles_crlf_comments_and_multiline() -> None:
    dec = SSEDecoder()
    assert dec.feed(b": keep-alive\r\n\r\nevent: x\r\ndata: a\r\ndata:b\r\n\r\n") == [b"a\nb"]
    assert dec.feed(b"data: tail") == []
    assert dec.flush() == [b"tail"]


def test_event_framing() -> None:
    assert sse_event({"a": 1}) == b'data: {"a":1}\n\n'
