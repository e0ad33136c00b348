"""Tool calls and response_format through the engine server's HTTP layer, against the scripted fake
engine: the OpenAI shapes of parsed calls, streamed tool_calls deltas and finish reasons (validated
against OpenAI's schemas), and what reaches the engine."""

from __future__ import annotations

import json

from engine_server_fake import FakeEngine
from test_engine_server_api import CHAT, chat_body, make, sse, valid

from inferstack.engine.structured.spec import GrammarKind

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]
REPLY = 'Sure.\n<tool_call>\n{"name": "lookup", "arguments": {"q": "a \\"b\\""}}\n</tool_call>'


def test_auto_tool_call_is_parsed_out_of_the_output() -> None:
    client, _, engine = make(FakeEngine(max_model_len=4096, reply=REPLY))
    body = valid("CreateChatCompletionResponse", client.post(CHAT, json=chat_body(tools=TOOLS, max_tokens=200)).json())
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "lookup"
    assert json.loads(call["function"]["arguments"]) == {"q": 'a "b"'}
    params = engine.calls[0][1]
    assert params.structured_outputs is None             # auto: free output, parsed afterwards
    prompt = bytes(engine.calls[0][0]).decode()
    assert "<tools>" in prompt and '"name": "lookup"' in prompt     # rendered into the system prompt


def test_streamed_tool_call_chunks_match_openai() -> None:
    client, _, _ = make(FakeEngine(max_model_len=4096, reply=REPLY))
    chunks = sse(client.post(CHAT, json=chat_body(tools=TOOLS, max_tokens=200, stream=True)).content)
    for c in chunks:
        valid("CreateChatCompletionStreamResponse", c, stream_chunk=True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [d for d in deltas if "tool_calls" in d]
    assert content.strip() == "Sure." and deltas[0] == {"role": "assistant", "content": ""}
    first = calls[0]["tool_calls"][0]
    assert first["id"].startswith("call_") and first["function"] == {"name": "lookup", "arguments": ""}
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in calls[1:])
    assert json.loads(args) == {"q": 'a "b"'} and len(calls) > 2           # arguments arrive piece by piece
    assert "<tool_call>" not in content
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}


def test_required_and_named_choices_send_a_grammar() -> None:
    client, _, engine = make(FakeEngine(
        max_model_len=4096, reply='<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call>'))
    named = {"type": "function", "function": {"name": "lookup"}}
    body = client.post(CHAT, json=chat_body(tools=TOOLS, tool_choice=named, max_tokens=200)).json()
    assert body["choices"][0]["finish_reason"] == "stop"                  # OpenAI: a forced named call ends in stop
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    spec, param = engine.grammars[-1]
    assert spec.kind is GrammarKind.GRAMMAR and param == "tools" and '"const": "lookup"' in spec.source
    assert engine.calls[-1][1].structured_outputs == spec
    client.post(CHAT, json=chat_body(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=9))
    assert engine.grammars[-1][1] == "tools" and "item (" not in engine.grammars[-1][0].source   # one call only


def test_response_format_reaches_the_engine_as_a_grammar() -> None:
    client, _, engine = make(FakeEngine(max_model_len=4096, reply='{"a": 1}'))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}}
    body = client.post(CHAT, json=chat_body(response_format=rf, max_tokens=20)).json()
    assert body["choices"][0]["message"]["content"] == '{"a": 1}'
    spec, param = engine.grammars[-1]
    assert spec.kind is GrammarKind.JSON and json.loads(spec.source) == schema and param == "response_format"
    client.post(CHAT, json=chat_body(response_format={"type": "text"}, max_tokens=5))
    assert engine.calls[-1][1].structured_outputs is None
    client.post("/v1/completions", json={"prompt": "x", "guided_regex": "[a-z]+", "max_tokens": 3})
    assert engine.grammars[-1][0].kind is GrammarKind.REGEX and engine.grammars[-1][1] == "guided_regex"


def test_streamed_tool_calls_carry_every_tokens_logprob_once() -> None:
    """Text held back (a call may be opening) still has its tokens' logprobs sent, on the choice's next
    chunk: the stream's logprobs are the non-streamed response's, in order."""
    client, _, _ = make(FakeEngine(max_model_len=4096, reply=REPLY))
    body = chat_body(tools=TOOLS, max_tokens=200, logprobs=True, top_logprobs=2)
    whole = client.post(CHAT, json=body).json()["choices"][0]["logprobs"]["content"]
    chunks = sse(client.post(CHAT, json={**body, "stream": True}).content)
    for c in chunks:
        valid("CreateChatCompletionStreamResponse", c, stream_chunk=True)
    streamed = [lp for c in chunks for lp in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert [lp["token"] for lp in streamed] == [lp["token"] for lp in whole]
    assert len(whole) == len(REPLY.encode()) + 1 and all(len(lp["top_logprobs"]) == 2 for lp in streamed)  # + EOS
    assert any("tool_calls" in c["choices"][0]["delta"] and c["choices"][0]["logprobs"] for c in chunks)
