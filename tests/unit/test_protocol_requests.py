import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from inferstack.protocol.errors import APIError, error_from_exception
from inferstack.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    parse_request,
)


def error_of(model: type[BaseModel], body: bytes) -> APIError:
    with pytest.raises(Exception) as info:
        parse_request(model, body)
    err = error_from_exception(info.value)
    assert err is not None, f"{info.value!r} was not mapped to a client error"
    return err


@pytest.mark.parametrize("prompt", ['"hi"', '["a", "b"]', "[1, 2, 3]", "[[1, 2], [3]]"])
def test_completion_prompt_forms(prompt: str) -> None:
    req = parse_request(CompletionRequest, f'{{"model": "m", "prompt": {prompt}}}'.encode())
    assert req.prompt and req.max_tokens == 16


def test_unknown_fields_are_kept_for_forwarding() -> None:
    req = parse_request(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "x"}], "store": true}')
    assert req.model_dump(exclude_none=True)["store"] is True


def test_vllm_extras_parse() -> None:
    req = parse_request(CompletionRequest, b'{"prompt": "x", "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, '
                                          b'"ignore_eos": true, "min_tokens": 2, "stop_token_ids": [7], '
                                          b'"priority": -3, "cache_salt": "t1", "skip_special_tokens": false}')
    assert (req.top_k, req.min_p, req.priority, req.cache_salt, req.stop_token_ids) == (5, 0.1, -3, "t1", [7])


@pytest.mark.parametrize(("body", "param"), [
    (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "x", "n": true}', "n"),
    (b'{"prompt": "x", "n": 1.5}', "n"),
    (b'{"prompt": "x", "stream": "yes"}', "stream"),
    (b'{"prompt": "x", "stream_options": {"include_usage": 1}}', "stream_options.include_usage"),
    (b'{"prompt": [1, -2]}', "prompt"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs"),
    (b'{"prompt": "x", "seed": 99999999999999999999999}', "seed"),
    (b'{}', "prompt"),
])
def test_wrong_types_name_the_field(body: bytes, param: str) -> None:
    err = error_of(CompletionRequest, body)
    assert err.status == 400 and err.param == param and param in err.message


@pytest.mark.parametrize(("body", "param"), [
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 30}', "top_logprobs"),
])
def test_chat_errors_name_the_field(body: bytes, param: str) -> None:
    err = error_of(ChatCompletionRequest, body)
    assert (err.status, err.param) == (400, param)


@pytest.mark.parametrize("body", [b"", b"{bad", b"[1]", b"null", b'"text"', b'{"prompt": "x", "temperature": NaN}'])
def test_malformed_bodies_are_400(body: bytes) -> None:
    err = error_of(CompletionRequest, body)
    assert err.status == 400
    assert err.envelope()["error"].keys() == {"message", "type", "param", "code"}


def test_detokenize_rejects_negative_ids() -> None:
    assert error_of(DetokenizeRequest, b'{"tokens": [1, -1]}').param == "tokens[1]"


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
                    | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12))
def test_any_json_is_a_request_or_a_400(value: object) -> None:
    import orjson

    for model in (ChatCompletionRequest, CompletionRequest):
        try:
            parse_request(model, orjson.dumps({"prompt": value, "messages": value, "n": value}))
        except Exception as exc:
            err = error_from_exception(exc)
            assert err is not None and err.status == 400


def test_internal_errors_are_not_blamed_on_the_client() -> None:
    assert error_from_exception(RuntimeError("boom")) is None
    assert error_from_exception(ValueError("bug")) is None

    class ParamError(ValueError):
        param = "top_p"

    err = error_from_exception(ParamError("top_p must be in (0, 1]"))
    assert err is not None and (err.status, err.param) == (400, "top_p")
