"""parameter-extractor and question-classifier: the strict schemas they send pass OpenAI's strict rules,
the request carries them as response_format, and replies map onto Dify's outputs and branches."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from inferstack.protocol.strict_schema import check_strict_schema
from inferstack.workflow.context import RunContext
from inferstack.workflow.dsl import Node
from inferstack.workflow.nodes import NodeFailure, NodeResult, Services
from inferstack.workflow.structured import ParameterExtractor, QuestionClassifier, extraction_schema

PARAMS = [
    {"name": "city", "type": "string", "description": "the city", "required": True},
    {"name": "days", "type": "number", "required": False},
    {"name": "unit", "type": "select", "options": ["celsius", "fahrenheit"], "required": True},
    {"name": "tags", "type": "array[string]", "required": True},
    {"name": "stops", "type": "array[object]", "required": False},
    {"name": "urgent", "type": "bool", "required": True},
]
CTX = RunContext({"start": {"q": "Weather in Paris for 3 days"}})
MODEL = {"provider": "inferstack", "name": "m", "completion_params": {"temperature": 0}}


def test_extraction_schema_is_strict_and_optional_fields_may_be_null() -> None:
    schema = extraction_schema(PARAMS)
    check_strict_schema(schema, "response_format 'parameters'", "response_format")  # raises if not strict
    assert schema["required"] == [p["name"] for p in PARAMS]
    assert schema["properties"]["unit"] == {"type": "string", "enum": ["celsius", "fahrenheit"]}
    assert schema["properties"]["days"] == {"anyOf": [{"type": "number"}, {"type": "null"}]}
    assert schema["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    with pytest.raises(NodeFailure, match="unknown type 'file'"):
        extraction_schema([{"name": "x", "type": "file"}])
    with pytest.raises(NodeFailure, match="select with no options"):
        extraction_schema([{"name": "x", "type": "select"}])


def run_node(executor: Any, data: dict[str, Any], reply_content: str,
             raw_message: bool = False) -> tuple[NodeResult, dict[str, Any]]:
    """Run one node against an in-process OpenAI-shaped endpoint that records the request; the reply is
    ``reply_content`` as the message's content, or (``raw_message``) the message itself as JSON."""
    seen: dict[str, Any] = {}
    message = json.loads(reply_content) if raw_message else {"content": reply_content}

    def handle(request: httpx.Request) -> httpx.Response:
        seen["body"], seen["headers"] = json.loads(request.content), request.headers
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", **message},
                                                      "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}})

    async def go() -> NodeResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
            svc = Services(client=client, gateway="http://gw/v1", api_key=None, session_id="run-1")
            node = Node("n", data["type"], "n", data, 1, None)
            return await executor.run(node, executor.resolve(node, CTX), svc)

    return asyncio.run(go()), seen


def test_parameter_extractor_request_and_outputs() -> None:
    data = {"type": "parameter-extractor", "model": MODEL, "query": ["start", "q"], "parameters": PARAMS[:3],
            "instruction": "Question: {{#start.q#}}", "reasoning_mode": "prompt"}
    result, seen = run_node(ParameterExtractor(), data, '{"city": "Paris", "days": 3, "unit": "celsius"}')
    body = seen["body"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    assert body["response_format"]["json_schema"]["schema"] == extraction_schema(PARAMS[:3])
    assert body["messages"][1] == {"role": "user", "content": "Weather in Paris for 3 days"}
    assert body["messages"][0]["content"].endswith("Question: Weather in Paris for 3 days")
    assert body["max_tokens"] == 256 and body["temperature"] == 0
    assert seen["headers"]["x-session-id"] == "run-1"
    assert result.outputs == {"city": "Paris", "days": 3, "unit": "celsius", "__is_success": 1, "__reason": None,
                              "__usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}}

    cut, _ = run_node(ParameterExtractor(), data, '{"city": "Par')  # cut off by max_tokens
    assert cut.outputs["__is_success"] == 0 and cut.outputs["city"] is None
    assert "not JSON" in cut.outputs["__reason"]


def test_question_classifier_branches_on_the_class_id() -> None:
    data = {"type": "question-classifier", "model": MODEL, "query_variable_selector": ["start", "q"],
            "classes": [{"id": "1", "name": "weather"}, {"id": "2", "name": "sports"}], "instruction": ""}
    result, seen = run_node(QuestionClassifier(), data, '{"category_name": "weather"}')
    schema = seen["body"]["response_format"]["json_schema"]["schema"]
    check_strict_schema(schema, "response_format 'classification'", "response_format")
    assert schema["properties"]["category_name"]["enum"] == ["weather", "sports"]
    assert (result.outputs["class_name"], result.outputs["class_id"], result.branch) == ("weather", "1", "1")
    with pytest.raises(NodeFailure, match="named no category"):
        run_node(QuestionClassifier(), data, '{"category_name": "cooking"}')
    with pytest.raises(NodeFailure, match="distinct names"):
        run_node(QuestionClassifier(), {**data, "classes": [{"id": "1", "name": "a"}, {"id": "2", "name": "a"}]}, "")


def test_parameter_extractor_function_call_mode_forces_a_strict_function() -> None:
    data = {"type": "parameter-extractor", "model": MODEL, "query": ["start", "q"], "parameters": PARAMS[:1],
            "reasoning_mode": "function_call"}
    arguments = '{"city": "Paris"}'
    reply = json.dumps({"content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "extract_parameters", "arguments": arguments}}]})
    result, seen = run_node(ParameterExtractor(), data, reply, raw_message=True)
    body = seen["body"]
    assert "response_format" not in body
    assert body["tool_choice"] == {"type": "function", "function": {"name": "extract_parameters"}}
    function = body["tools"][0]["function"]
    assert function["strict"] is True and function["parameters"] == extraction_schema(PARAMS[:1])
    check_strict_schema(function["parameters"], "function 'extract_parameters'", "tools[0].function.parameters")
    assert result.outputs["city"] == "Paris" and result.outputs["__is_success"] == 1
