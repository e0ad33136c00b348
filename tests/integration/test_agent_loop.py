"""The agent loop against the real glossary MCP server (in memory, official SDK) and a scripted
OpenAI-compatible model: agents as tools, MCP calls, is_error results back to the model, the step limit,
one session id per agent conversation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferstack.agents.glossary_server import server as glossary
from inferstack.agents.loop import AgentError, AgentRunner, RunSettings, mcp_targets
from inferstack.agents.manifest import load_bundle
from inferstack.workflow.chat import Gateway
from inferstack.workflow.mcp_pool import McpConnections

EXAMPLE = Path(__file__).resolve().parents[2] / "src/inferstack/assets/agents/glossary-team.yaml"


def reply(message: dict[str, Any]) -> httpx.Response:
    finish = "tool_calls" if "tool_calls" in message else "stop"
    choice = {"message": {"role": "assistant", **message}, "finish_reason": finish}
    return httpx.Response(200, json={"choices": [choice],
                                     "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"content": None, "tool_calls": [{"id": f"call_{name}", "type": "function",
                                             "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def scripted(requests: list[dict[str, Any]], term: str = "prefix caching", loop_forever: bool = False):
    """explainer asks researcher; researcher calls lookup(term); each answers with what its tool returned."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        requests.append({"body": body, "session": request.headers.get("x-session-id")})
        last = body["messages"][-1]
        tools = {t["function"]["name"] for t in body.get("tools", [])}
        if last["role"] == "tool" and not loop_forever:
            return reply({"content": f"answer: {last['content']}"})
        if "researcher" in tools:
            return reply(call("researcher", request=term))
        return reply(call("lookup", term=term))

    return handle


def run_agent(handle: Any, max_steps: int = 4) -> Any:
    bundle = load_bundle([EXAMPLE])
    targets, names = mcp_targets(bundle, {"glossary": glossary})

    async def go() -> Any:
        pool = McpConnections(targets)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
            runner = AgentRunner(bundle, Gateway(client, "http://gw/v1", None, ""), pool,
                                 RunSettings(max_steps=max_steps), names)
            try:
                return await runner.run(bundle.get("Agent", "explainer", "default"), "Explain prefix caching.")
            finally:
                await pool.aclose()

    return asyncio.run(go())


def test_agent_calls_agent_calls_mcp_tool() -> None:
    requests: list[dict[str, Any]] = []
    result = run_agent(scripted(requests))
    definition = "prefix caching: Prefix caching reuses the KV blocks of a prompt prefix"
    assert result.answer.startswith("answer: answer: " + definition)
    trace = [(s.agent, s.kind, s.name) for s in result.steps]
    assert trace == [("explainer", "model", "smollm2-135m"), ("researcher", "model", "smollm2-135m"),
                     ("researcher", "tool", "lookup"), ("researcher", "model", "smollm2-135m"),
                     ("researcher", "answer", ""), ("explainer", "agent", "researcher"),
                     ("explainer", "model", "smollm2-135m"), ("explainer", "answer", "")]
    first = requests[0]["body"]
    assert first["model"] == "smollm2-135m" and first["temperature"] == 0.0 and first["max_tokens"] == 64
    assert first["messages"][0]["content"].startswith("You explain inference-serving concepts")
    assert [t["function"]["name"] for t in first["tools"]] == ["researcher"]
    lookup = requests[1]["body"]["tools"][0]["function"]
    assert lookup["name"] == "lookup" and lookup["parameters"]["required"] == ["term"]  # from the MCP server
    sessions = [r["session"] for r in requests]
    assert sessions[0] == sessions[3] != sessions[1] == sessions[2]  # one session per agent conversation
    assert sessions[0].endswith("/default/explainer") and result.prompt_tokens == 40


def test_tool_error_goes_back_to_the_model() -> None:
    requests: list[dict[str, Any]] = []
    result = run_agent(scripted(requests, term="zzz"))
    failed = [s for s in result.steps if s.kind == "tool"]
    assert failed[0].is_error and "no entry for 'zzz'" in failed[0].detail
    tool_message = requests[2]["body"]["messages"][-1]
    assert tool_message["role"] == "tool" and "no entry for 'zzz'" in tool_message["content"]


def test_step_limit() -> None:
    with pytest.raises(AgentError, match="agent researcher: no answer after --max-steps 2 model calls"):
        run_agent(scripted([], loop_forever=True), max_steps=2)


def test_serve_runs_an_agent_over_http() -> None:
    from starlette.testclient import TestClient

    from inferstack.agents.serve import AgentService, build_app

    bundle = load_bundle([EXAMPLE])
    targets, names = mcp_targets(bundle, {"glossary": glossary})
    model = httpx.AsyncClient(transport=httpx.MockTransport(scripted([])))
    service = AgentService(bundle, Gateway(model, "http://gw/v1", None, ""), McpConnections(targets), names,
                           RunSettings(max_steps=4))
    with TestClient(build_app(service)) as client:
        assert [a["name"] for a in client.get("/v1/agents").json()["data"]] == ["explainer", "researcher"]
        out = client.post("/v1/agents/researcher/run", json={"task": "prefix caching?"}).json()
        assert out["answer"].startswith("answer: prefix caching: Prefix caching reuses")
        assert [s["kind"] for s in out["steps"]] == ["model", "tool", "model", "answer"]
        bad = client.post("/v1/agents/researcher/run", json={"task": ""})
        assert bad.status_code == 400 and "'task'" in bad.json()["error"]["message"]
        assert client.post("/v1/agents/ghost/run", json={"task": "x"}).status_code == 404


def test_unknown_tool_and_bad_arguments_go_back_as_errors() -> None:
    requests: list[dict[str, Any]] = []
    bad_calls = iter([call("nope"), {"content": None, "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": "{not json"}}]}])

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        requests.append(body)
        if "researcher" in {t["function"]["name"] for t in body.get("tools", [])}:
            last = body["messages"][-1]
            return reply({"content": "done"} if last["role"] == "tool" else call("researcher", request="x"))
        return reply(next(bad_calls, {"content": "gave up"}))

    result = run_agent(handle)
    errors = [s.detail for s in result.steps if s.is_error]
    assert errors == ["no tool named 'nope'", "arguments are not a JSON object: {not json"]
    assert requests[2]["messages"][-1] == {"role": "tool", "tool_call_id": "call_nope",
                                           "content": "Error: no tool named 'nope'"}
    assert result.answer == "done"
