"""json_usage reads a whole response's usage from its tail: the same answer as parsing the whole response."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.gateway.pipeline.usage import json_usage

# keys and strings that put "usage" where a tail parse could be fooled: a nested key, a string value, a duplicate
_KEYS = st.sampled_from(["usage", "choices", "id", "x", "usage\"", "kv_transfer_params"])
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.sampled_from(["usage", '"usage"', "u"]),
                    st.text(max_size=8))
_VALUES = st.recursive(_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(_KEYS, inner, max_size=3)), max_leaves=12)
_COUNTS = st.fixed_dictionaries({"prompt_tokens": st.integers(0, 99), "completion_tokens": st.integers(0, 99)})
_USAGE = st.one_of(_COUNTS, _VALUES)


def _whole(data: bytes) -> dict | None:
    """What the gateway read before: the whole response parsed."""
    try:
        usage = orjson.loads(data).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


@settings(max_examples=400, deadline=None)
@given(before=st.lists(st.tuples(_KEYS, _VALUES), max_size=4), usage=_USAGE,
       after=st.lists(st.tuples(_KEYS, _VALUES), max_size=3), spaced=st.booleans())
def test_tail_parse_agrees_with_the_whole_response(before, usage, after, spaced):
    items = [*before, ("usage", usage), *after]
    body = "{" + ",".join(f"{orjson.dumps(k).decode()}:{orjson.dumps(v).decode()}" for k, v in items) + "}"
    data = (body.replace(":", ": ") + "\n") if spaced else body  # spacing as other engines write it
    data = data.encode()
    assert json_usage(data) == _whole(data)


def test_nested_and_string_usage_are_not_taken_for_the_response_s():
    nested_last = b'{"usage":{"completion_tokens":3},"choices":[{"usage":{"completion_tokens":99}}]}'
    assert json_usage(nested_last) == {"completion_tokens": 3}
    assert json_usage(b'{"choices":[{"message":{"content":"usage"}}],"id":"usage"}') is None
    assert json_usage(b'[{"usage":{"completion_tokens":1}}]') is None
    assert json_usage(b'{"usage":{"completion_tokens":1},"usage":{"completion_tokens":2}}') == {"completion_tokens": 2}
    assert json_usage(b'{"id":1}') is None
