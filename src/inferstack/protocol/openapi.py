"""The OpenAPI document our servers publish at ``/openapi.json``.

Request and response schemas are the official OpenAI ones, shipped in ``openai-api-subset.json``
(extracted from github.com/openai/openai-openapi, API version 2.3.0, MIT licence; see
shared/specs/README.md of the design repository), so clients and fuzzers (schemathesis) exercise the real fields.
Only the vLLM utility endpoints (/tokenize, /detokenize) have schemas of our own.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import orjson

SPEC_FILE = "openai-api-subset.json"


@functools.cache
def _spec_bytes() -> bytes:
    return resources.files(__package__).joinpath(SPEC_FILE).read_bytes()


def openai_spec() -> dict[str, Any]:
    """A fresh copy of the OpenAI subset (OpenAPI 3.1 with ``components.schemas``)."""
    return orjson.loads(_spec_bytes())


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_ERROR = {"description": "OpenAI error envelope", "content": {"application/json": {"schema": _ref("ErrorResponse")}}}

_OWN_SCHEMAS: dict[str, Any] = {
    "TokenizeRequest": {
        "type": "object",
        "description": "vLLM's /tokenize: give `prompt` or chat `messages`.",
        "properties": {
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "messages": {"type": "array", "minItems": 1,
                         "items": _ref("ChatCompletionRequestMessage")},
            "add_special_tokens": {"type": "boolean"},
            "add_generation_prompt": {"type": "boolean"},
            "return_token_strs": {"type": "boolean"},
        },
    },
    "TokenizeResponse": {
        "type": "object",
        "required": ["count", "max_model_len", "tokens"],
        "properties": {
            "count": {"type": "integer"},
            "max_model_len": {"type": "integer"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
            "token_strs": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        },
    },
    "DetokenizeRequest": {
        "type": "object",
        "required": ["tokens"],
        "properties": {
            "model": {"type": "string"},
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        },
    },
    "DetokenizeResponse": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
}


def _post(summary: str, request: str, response: str, streams: bool, errors: tuple[int, ...]) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref(response)}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": {"description": "OK", "content": content}, **{str(s): _ERROR for s in errors}},
    }}


def _get(summary: str, response: dict[str, Any] | None, media: str = "application/json",
         errors: tuple[int, ...] = ()) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if response is not None:
        ok["content"] = {media: {"schema": response}}
    return {"get": {"summary": summary, "responses": {"200": ok, **{str(s): _ERROR for s in errors}}}}


def engine_openapi(title: str = "inferstack engine", version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI document of the engine server (the gateway builds its own from the same parts)."""
    spec = openai_spec()
    schemas = spec["components"]["schemas"]
    schemas.update(copy.deepcopy(_OWN_SCHEMAS))
    gen_errors = (400, 401, 404, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible API; schemas from the official OpenAI OpenAPI document "
                                f"(API {spec['info'].get('version', '?')})."},
        "paths": {
            "/v1/chat/completions": _post("Create a chat completion", "CreateChatCompletionRequest",
                                          "CreateChatCompletionResponse", True, gen_errors),
            "/v1/completions": _post("Create a completion", "CreateCompletionRequest",
                                     "CreateCompletionResponse", True, gen_errors),
            "/v1/models": _get("List the served model", _ref("ListModelsResponse"), errors=(401, 503)),
            "/tokenize": _post("Tokenize a prompt or chat messages (vLLM)", "TokenizeRequest",
                               "TokenizeResponse", False, gen_errors),
            "/detokenize": _post("Turn token ids back into text (vLLM)", "DetokenizeRequest",
                                 "DetokenizeResponse", False, gen_errors),
            "/health": _get("Liveness: 200 while the process serves", None),
            "/ready": _get("Readiness: 200 once the model is loaded, 503 before and while draining", None,
                           errors=(503,)),
            "/metrics": _get("Prometheus metrics (vLLM names)", {"type": "string"}, media="text/plain"),
        },
        "components": {"schemas": schemas},
    }


def _null_for_nullable(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` (left in places of the 3.1 document) as a JSON-Schema null branch."""
    if isinstance(node, list):
        return [_null_for_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _null_for_nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def schema_validator(name: str, *, stream_chunk: bool = False) -> Any:
    """A jsonschema validator for component ``name`` of the OpenAI subset (needs ``jsonschema``; for tests
    and clients that check servers). ``stream_chunk=True`` allows the ``finish_reason: null`` that
    streamed completion chunks carry until the last one (the spec types it as a plain string)."""
    from jsonschema import Draft202012Validator

    spec = _null_for_nullable(openai_spec())
    if stream_chunk:
        choice = spec["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
        choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    return Draft202012Validator(schema)
