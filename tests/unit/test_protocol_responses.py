"""Every response builder's output validates against the official OpenAI schemas."""

import pytest

from inferstack.protocol import responses as R
from inferstack.protocol.errors import APIError
from inferstack.protocol.openapi import engine_openapi, openai_spec, schema_validator


def check(name: str, obj: dict, stream_chunk: bool = False) -> None:
    errors = list(schema_validator(name, stream_chunk=stream_chunk).iter_errors(obj))
    assert not errors, [e.message for e in errors]


def test_chat_completion_with_logprobs() -> None:
    lp = R.chat_logprobs([R.chat_logprob_entry("Hi", -0.1, [("Hi", -0.1), ("Yo", -2.5)])])
    check("CreateChatCompletionResponse", R.chat_completion(
        "chatcmpl-1", 1, "m", [R.chat_choice(0, "Hi", "stop", lp), R.chat_choice(1, "", "length")],
        R.usage(5, 3, cached_tokens=2)))


def test_chat_chunks() -> None:
    check("CreateChatCompletionStreamResponse",
          R.chat_chunk("c", 1, "m", [R.chat_chunk_choice(0, {"role": "assistant", "content": ""})],
                       include_usage_field=True))
    check("CreateChatCompletionStreamResponse", R.chat_chunk("c", 1, "m", [R.chat_chunk_choice(0, {}, "stop")]))
    check("CreateChatCompletionStreamResponse", R.chat_chunk("c", 1, "m", [], R.usage(1, 2, 0)))


def test_completion_and_chunk() -> None:
    lp = R.completion_logprobs(["a", "b"], [-0.1, -0.2], [{"a": -0.1}, {"b": -0.2}], [0, 1])
    check("CreateCompletionResponse", R.completion("cmpl-1", 1, "m", [R.completion_choice(0, "ab", "stop", lp)],
                                                   R.usage(2, 2)))
    check("CreateCompletionResponse", R.completion("cmpl-1", 1, "m", [R.completion_choice(0, "a", None)]),
          stream_chunk=True)


def test_streamed_finish_reason_null_is_only_allowed_for_chunks() -> None:
    body = R.completion("cmpl-1", 1, "m", [R.completion_choice(0, "a", None)])
    assert list(schema_validator("CreateCompletionResponse").iter_errors(body))


def test_models_and_errors() -> None:
    check("ListModelsResponse", R.model_list([R.model_card("m", 1, max_model_len=8)]))
    check("ErrorResponse", APIError(400, "bad", param="n").envelope())
    check("ErrorResponse", APIError(503, "later").envelope())


def test_openapi_document_refs_resolve() -> None:
    doc = engine_openapi()
    schemas = doc["components"]["schemas"]
    assert set(openai_spec()["components"]["schemas"]) <= set(schemas)

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return own + [r for v in node.values() for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    missing = {r for r in refs(doc) if r.split("/")[-1] not in schemas}
    assert not missing
    assert doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateChatCompletionRequest"}


@pytest.mark.parametrize("status", [400, 401, 404, 413, 429, 500, 503])
def test_error_types(status: int) -> None:
    env = APIError(status, "x").envelope()["error"]
    assert env["type"] and env["message"] == "x"
