"""The agent loop: a Declarative agent's system message, its tools (MCP servers' tools, other agents)
offered as OpenAI function tools through the gateway, each tool call executed and its result sent back,
until the model answers without a tool call or the step limit is reached.

One step = one model call. An agent used as a tool is a function with one string argument, `request`;
calling it runs that agent's own loop (its own steps, from the same budget of depth) and returns its
answer. Each agent conversation carries its own session id (`<run>/<agent>`), so the gateway keeps its
growing prefix on one replica. An MCP result with `is_error` goes back to the model as text.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from inferstack.agents.manifest import Bundle, Resource, tool_target
from inferstack.workflow.chat import ChatError, Gateway, chat
from inferstack.workflow.mcp_pool import McpConnections, describe, stdio_server

MAX_DEPTH = 5  # agents calling agents: deeper than this is a loop the manifest check did not catch


class AgentError(Exception):
    """The agent could not finish; the message names the agent and the step."""


@dataclass(frozen=True)
class Step:
    agent: str
    depth: int
    index: int                   # the agent's model call this belongs to (1-based)
    kind: str                    # "model", "tool" (MCP), "agent" (a sub-agent) or "answer"
    name: str = ""
    detail: str = ""             # arguments, result or answer text (shortened in the trace)
    tokens: int = 0
    elapsed_ms: float = 0.0
    is_error: bool = False


@dataclass
class RunSettings:
    max_steps: int = 8
    model: str | None = None          # overrides the ModelConfig's model
    first_tool_choice: str = "auto"   # "required": force a tool call on an agent's first step
    temperature: float | None = None  # overrides the ModelConfig's
    max_tokens: int | None = None


@dataclass
class FunctionTool:
    spec: dict[str, Any]              # the OpenAI `tools[]` entry
    server: str | None = None         # MCP server name, or None for an agent tool
    remote_name: str = ""             # the MCP tool's name / the agent's name
    agent: Resource | None = None


@dataclass
class AgentResult:
    answer: str
    steps: list[Step] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def function_name(name: str) -> str:
    """OpenAI function names allow [a-zA-Z0-9_-]{1,64}."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64]


class AgentRunner:
    def __init__(self, bundle: Bundle, gateway: Gateway, mcp: McpConnections, settings: RunSettings,
                 mcp_names: dict[tuple[str, str], str], on_step: Callable[[Step], None] | None = None) -> None:
        self.bundle, self.gateway, self.mcp, self.settings = bundle, gateway, mcp, settings
        self.mcp_names = mcp_names     # (namespace, MCP server resource name) → key in `mcp`
        self.on_step = on_step or (lambda step: None)
        self.run_id = uuid.uuid4().hex[:12]
        self.result = AgentResult("")

    async def run(self, agent: Resource, task: str) -> AgentResult:
        self.result.answer = await self._loop(agent, task, 0)
        return self.result

    def _emit(self, step: Step) -> None:
        self.result.steps.append(step)
        self.on_step(step)

    async def _loop(self, agent: Resource, task: str, depth: int) -> str:
        if depth > MAX_DEPTH:
            raise AgentError(f"agent {agent.name}: agents nested deeper than {MAX_DEPTH}")
        decl = agent.spec.declarative
        if decl is None:
            raise AgentError(f"agent {agent.name} is a BYO agent (its own image); inferstack runs Declarative ones")
        tools = await self._tools(agent)
        body = self._model_body(agent)
        gw = replace(self.gateway, session_id=f"{self.run_id}/{agent.namespace}/{agent.name}")
        messages: list[dict[str, Any]] = [{"role": "system", "content": decl.system_message or ""},
                                          {"role": "user", "content": task}]
        for index in range(1, self.settings.max_steps + 1):
            request = {**body, "messages": messages}
            if tools:
                request["tools"] = [t.spec for t in tools.values()]
                request["tool_choice"] = self.settings.first_tool_choice if index == 1 else "auto"
            t0 = time.perf_counter()
            try:
                reply = await chat(gw, request)
            except ChatError as exc:
                raise AgentError(f"agent {agent.name}, step {index}: {exc}") from None
            self.result.prompt_tokens += reply.usage.get("prompt_tokens", 0)
            self.result.completion_tokens += reply.usage.get("completion_tokens", 0)
            calls = reply.message.get("tool_calls") or []
            self._emit(Step(agent.name, depth, index, "model", body["model"] or "",
                            f"{len(calls)} tool call(s)" if calls else "answer",
                            reply.usage.get("total_tokens", 0), (time.perf_counter() - t0) * 1000))
            if not calls:
                answer = reply.message.get("content") or ""
                self._emit(Step(agent.name, depth, index, "answer", detail=answer))
                return answer
            messages.append({"role": "assistant", "content": reply.message.get("content"), "tool_calls": calls})
            for call in calls:
                content = await self._call(agent, tools, call, depth, index)
                messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": content})
        raise AgentError(f"agent {agent.name}: no answer after --max-steps {self.settings.max_steps} model calls")

    def _model_body(self, agent: Resource) -> dict[str, Any]:
        name = agent.spec.declarative.model_config_name
        config = self.bundle.get("ModelConfig", name, agent.namespace)
        openai = config.spec.open_ai if config else None
        model = self.settings.model or (config.spec.model if config else None)
        if model is None:
            raise AgentError(f"agent {agent.name}: ModelConfig {agent.namespace}/{name} is not in "
                             f"{self.bundle.source}; add it or pass --model")
        body: dict[str, Any] = {"model": model}
        temperature = self.settings.temperature if self.settings.temperature is not None else (
            openai.temperature if openai else None)
        if temperature is not None:
            body["temperature"] = float(temperature)
        max_tokens = self.settings.max_tokens or (openai.max_tokens if openai else None)
        if max_tokens:
            body["max_tokens"] = max_tokens
        if openai is not None and openai.seed is not None:
            body["seed"] = openai.seed
        return body

    async def _tools(self, agent: Resource) -> dict[str, FunctionTool]:
        out: dict[str, FunctionTool] = {}
        for tool in agent.spec.declarative.tools:
            if tool.agent is not None:
                ns, name = tool_target(agent, tool.agent)
                target = self.bundle.get("Agent", name, ns)
                spec = {"type": "function", "function": {
                    "name": function_name(name), "description": target.spec.description or f"the agent {name}",
                    "parameters": {"type": "object", "properties": {"request": {
                        "type": "string", "description": "what to ask this agent"}}, "required": ["request"]}}}
                self._add(out, agent, FunctionTool(spec, None, name, target))
            elif tool.mcp_server is not None:
                await self._mcp_tools(out, agent, tool.mcp_server)
        return out

    async def _mcp_tools(self, out: dict[str, FunctionTool], agent: Resource, ref: Any) -> None:
        ns, name = tool_target(agent, ref)
        server = self.mcp_names.get((ns, name))
        if server is None:
            raise AgentError(f"agent {agent.name}: MCP server {ns}/{name} is neither in {self.bundle.source} "
                             f"(RemoteMCPServer or MCPServer) nor given with --mcp {name}=URL-or-command")
        try:
            listed = await self.mcp.list_tools(server)
        except Exception as exc:  # any transport or protocol failure: the agent cannot start
            raise AgentError(f"agent {agent.name}: MCP server {name}: {describe(exc)}") from None
        offered = {t.name: t for t in listed.tools}
        for wanted in ref.tool_names or sorted(offered):
            if wanted not in offered:
                raise AgentError(f"agent {agent.name}: MCP server {name} has no tool {wanted!r} "
                                 f"(it has {', '.join(sorted(offered))})")
            t = offered[wanted]
            spec = {"type": "function", "function": {"name": function_name(t.name),
                                                     "description": t.description or t.name,
                                                     "parameters": t.input_schema}}
            self._add(out, agent, FunctionTool(spec, server, t.name))

    @staticmethod
    def _add(out: dict[str, FunctionTool], agent: Resource, tool: FunctionTool) -> None:
        name = tool.spec["function"]["name"]
        if name in out:
            raise AgentError(f"agent {agent.name}: two tools are named {name!r}")
        out[name] = tool

    async def _call(self, agent: Resource, tools: dict[str, FunctionTool], call: dict[str, Any],
                    depth: int, index: int) -> str:
        fn = call.get("function") or {}
        name = str(fn.get("name", ""))
        tool = tools.get(name)
        t0 = time.perf_counter()
        raw = fn.get("arguments") or "{}"
        try:  # OpenAI sends a JSON string; some servers send the object itself
            arguments = raw if isinstance(raw, dict) else json.loads(str(raw))
        except ValueError:
            arguments = None
        if tool is None or not isinstance(arguments, dict):
            why = (f"no tool named {name!r}" if tool is None
                   else f"arguments are not a JSON object: {fn.get('arguments')}")
            self._emit(Step(agent.name, depth, index, "tool", name, why, is_error=True))
            return f"Error: {why}"
        if tool.agent is not None:
            answer = await self._loop(tool.agent, str(arguments.get("request", "")), depth + 1)
            self._emit(Step(agent.name, depth, index, "agent", tool.remote_name, answer,
                            elapsed_ms=(time.perf_counter() - t0) * 1000))
            return answer
        try:
            result = await self.mcp.call(tool.server or "", tool.remote_name, arguments)
        except Exception as exc:  # the model sees a failed call as an error result, as with is_error
            text, is_error = f"Error: {describe(exc)}", True
        else:
            text = "".join(c.text for c in result.content if c.type == "text")
            is_error = bool(result.is_error)
        self._emit(Step(agent.name, depth, index, "tool", tool.remote_name, f"{json.dumps(arguments)} -> {text}",
                        elapsed_ms=(time.perf_counter() - t0) * 1000, is_error=is_error))
        return text


def mcp_targets(bundle: Bundle, overrides: dict[str, object]) -> tuple[dict[str, object], dict[tuple[str, str], str]]:
    """What `McpConnections` connects to, keyed `namespace/name`, and (namespace, name) → that key.

    A RemoteMCPServer is its URL (Streamable HTTP); an MCPServer with transportType stdio is its
    deployment's `cmd args...` run as a local process; `--mcp NAME=...` replaces a server of that name
    (or adds one) in every namespace."""
    targets: dict[str, object] = {}
    names: dict[tuple[str, str], str] = {}
    for res in bundle.resources.values():
        key = f"{res.namespace}/{res.name}"
        if res.name in overrides:
            targets[key] = overrides[res.name]
        elif res.kind == "RemoteMCPServer" and res.spec.protocol == "STREAMABLE_HTTP":
            targets[key] = res.spec.url
        elif res.kind == "MCPServer" and res.spec.transport_type == "stdio":
            targets[key] = stdio_server(res.spec.deployment.cmd, res.spec.deployment.args)
        else:
            continue  # SSE / http MCPServer: only reachable inside a cluster; --mcp can stand in
        names[(res.namespace, res.name)] = key
    for agent in bundle.agents():
        for name, target in overrides.items():
            key = f"{agent.namespace}/{name}"
            targets.setdefault(key, target)
            names.setdefault((agent.namespace, name), key)
    return targets, names
