"""Structured outputs and tool calls from the emulated engine parse and end (it has no logits: it
writes the grammar's shortest way out), so agent and workflow traffic can run on emulated fleets."""

from __future__ import annotations

import json

import openai
import pytest

from support.procs import start_inferstack


@pytest.fixture(scope="module")
def client():
    srv = start_inferstack(["engine", "serve", "--emulate", "h100:llama-3-8b"])
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
    srv.stop()


MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"], "additionalProperties": False}}}


def test_required_tool_call_is_complete_json(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "add 2 and 3"}],
                                       tools=[ADD], tool_choice="required", max_tokens=64)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}


def test_json_schema_output_parses(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["city", "days", "tags"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "plan a trip"}],
                                       max_tokens=64, response_format={"type": "json_schema", "json_schema": {
                                           "name": "trip", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    assert set(json.loads(r.choices[0].message.content)) == {"city", "days", "tags"}
