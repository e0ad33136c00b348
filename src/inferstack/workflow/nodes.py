"""Node executors: each turns a node's config plus the run's values into resolved inputs (pure, the
cache key's material), then runs on those inputs alone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inferstack.workflow.chat import ChatError, Gateway, Reply, chat
from inferstack.workflow.conditions import evaluate_cases
from inferstack.workflow.context import RunContext
from inferstack.workflow.dsl import Node
from inferstack.workflow.mcp_pool import McpConnections, describe
from inferstack.workflow.sandbox import SandboxError, SandboxLimits, run_python

COMPLETION_PARAMS = ("temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty",
                     "frequency_penalty")


class NodeFailure(Exception):
    """The node could not produce its outputs (retried if the node allows it)."""


@dataclass
class Services:
    client: httpx.AsyncClient
    gateway: str               # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    api_key: str | None
    session_id: str            # sent as X-Session-Id so the gateway keeps a run's prefixes together
    allow_hosts: frozenset[str] = frozenset()
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    # tool nodes: provider id → one MCP session per server (the owner closes it)
    mcp: McpConnections = field(default_factory=McpConnections)

    def chat_gateway(self) -> Gateway:
        return Gateway(self.client, self.gateway, self.api_key, self.session_id)


@dataclass
class NodeResult:
    outputs: dict[str, Any]
    branch: str | None = None  # the source handle taken (if-else); None: every outgoing edge
    usage: dict[str, int] = field(default_factory=dict)


class Executor(Protocol):
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]: ...

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult: ...


def _variables(node: Node, ctx: RunContext) -> dict[str, Any]:
    return {v["variable"]: ctx.get(v["value_selector"]) for v in node.data.get("variables") or []}


class Start:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        return dict(ctx.values.get("sys", {}).get("inputs", {}))

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        return NodeResult(resolved)


class Llm:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        model = node.data.get("model") or {}
        prompt = node.data.get("prompt_template") or []
        if isinstance(prompt, dict):  # completion-mode models keep one text template
            prompt = [{"role": "user", "text": prompt.get("text", "")}]
        messages = [{"role": p.get("role", "user"), "content": ctx.render(p.get("text", ""))} for p in prompt]
        params = {k: v for k, v in (model.get("completion_params") or {}).items() if k in COMPLETION_PARAMS}
        return {"model": model.get("name"), "messages": messages, "params": params}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        body = {"model": resolved["model"], "messages": resolved["messages"], **resolved["params"]}
        reply = await complete(svc, body)
        text = reply.message.get("content") or ""
        return NodeResult({"text": text, "usage": reply.usage}, usage=reply.usage)


async def complete(svc: Services, body: dict[str, Any]) -> Reply:
    """A chat completion for a node; gateway errors fail (and retry) the node."""
    try:
        return await chat(svc.chat_gateway(), body)
    except ChatError as exc:
        raise NodeFailure(str(exc)) from None


class Code:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        return {"code": node.data.get("code", ""), "inputs": _variables(node, ctx)}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        if node.data.get("code_language", "python3") != "python3":
            raise NodeFailure(f"code_language {node.data.get('code_language')!r}: only python3 runs here")
        try:
            outputs = await run_python(resolved["code"], resolved["inputs"], svc.sandbox)
        except SandboxError as exc:
            raise NodeFailure(str(exc)) from None
        missing = sorted(set(node.data.get("outputs") or {}) - set(outputs))
        if missing:
            raise NodeFailure(f"main() did not return the declared outputs {missing}")
        return NodeResult(outputs)


_JINJA = ImmutableSandboxedEnvironment(autoescape=False)


@lru_cache(maxsize=256)
def _compiled(template: str) -> Template:
    """Compiling is most of a render's cost; a workflow renders the same templates again and again."""
    return _JINJA.from_string(template)


class TemplateTransform:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        return {"template": node.data.get("template", ""), "inputs": _variables(node, ctx)}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        try:
            text = _compiled(resolved["template"]).render(**resolved["inputs"])
        except Exception as exc:  # any template error (syntax, sandbox refusal, type) fails the node
            raise NodeFailure(f"template: {type(exc).__name__}: {exc}") from None
        return NodeResult({"output": text})


class IfElse:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        return {"case": evaluate_cases(node.data, ctx)}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        case = resolved["case"]
        return NodeResult({"result": case is not None, "selected_case_id": case or "false"},
                          branch=case or "false")


class VariableAggregator:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        settings = node.data.get("advanced_settings") or {}
        if settings.get("group_enabled"):
            return {g["group_name"]: {"output": _first(g.get("variables") or [], ctx)}
                    for g in settings.get("groups") or []}
        return {"output": _first(node.data.get("variables") or [], ctx)}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        return NodeResult(resolved)


def _first(selectors: list[list[str]], ctx: RunContext) -> Any:
    """The value of the first selector whose node ran (the branch that was taken)."""
    return next((v for v in (ctx.get(s) for s in selectors) if v is not None), None)


class Passthrough:
    """iteration-start: marks where an iteration's sub-graph begins."""

    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        return {}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        return NodeResult({})


class Answer:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        return {"answer": ctx.render(node.data.get("answer", ""))}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        return NodeResult(resolved)


class End:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        return {o["variable"]: ctx.get(o["value_selector"]) for o in node.data.get("outputs") or []}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        return NodeResult(resolved)


class HttpRequest:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        d = node.data
        body = d.get("body") or {}
        data = body.get("data")
        if isinstance(data, list):  # newer DSLs: [{type, key, value}]
            data = "".join(str(item.get("value", "")) for item in data) if body.get("type") != (
                "x-www-form-urlencoded") else {i.get("key"): ctx.render(str(i.get("value", ""))) for i in data}
        return {"method": str(d.get("method", "get")).upper(), "url": ctx.render(d.get("url", "")),
                "headers": _pairs(ctx.render(d.get("headers") or "")),
                "params": _pairs(ctx.render(d.get("params") or "")), "body_type": body.get("type", "none"),
                "body": ctx.render(data) if isinstance(data, str) else data}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        host = urlsplit(resolved["url"]).hostname or ""
        if host not in svc.allow_hosts:
            raise NodeFailure(f"host {host!r} is not in the HTTP allow-list (add it with --allow-host {host})")
        kwargs: dict[str, Any] = {}
        if resolved["body_type"] == "json" and resolved["body"]:
            kwargs["content"] = resolved["body"].encode()
            resolved["headers"].setdefault("Content-Type", "application/json")
        elif resolved["body_type"] == "x-www-form-urlencoded":
            kwargs["data"] = resolved["body"]
        elif resolved["body"]:
            kwargs["content"] = str(resolved["body"]).encode()
        try:  # no redirects: a redirect could leave the allow-list
            resp = await svc.client.request(resolved["method"], resolved["url"], headers=resolved["headers"],
                                            params=resolved["params"], follow_redirects=False, **kwargs)
        except httpx.HTTPError as exc:
            raise NodeFailure(f"{resolved['method']} {resolved['url']}: {type(exc).__name__}: {exc}") from None
        return NodeResult({"status_code": resp.status_code, "body": resp.text,
                           "headers": json.dumps(dict(resp.headers))})


def _pairs(text: str) -> dict[str, str]:
    """Dify's `key:value` lines."""
    out = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            out[key.strip()] = value.strip()
    return out


class Tool:
    """An MCP tool call with the official SDK's `Client`; an `is_error` result is an output, not a failure,
    so a later LLM node can see what went wrong (as a model sees tool errors)."""

    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for name, spec in (node.data.get("tool_parameters") or {}).items():
            kind, value = spec.get("type"), spec.get("value")
            if kind == "variable":
                args[name] = ctx.get(value or [])
            else:
                args[name] = ctx.render(value) if isinstance(value, str) else value
        return {"server": node.data.get("provider_id") or node.data.get("provider_name"),
                "tool": node.data.get("tool_name"), "arguments": args}

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        server = resolved["server"]
        if server not in svc.mcp:
            raise NodeFailure(f"no MCP server {server!r} configured (give it with --mcp {server}=URL-or-command)")
        try:
            result = await svc.mcp.call(server, resolved["tool"], resolved["arguments"])
        except Exception as exc:  # transport and protocol errors of any kind fail (and retry) the node
            raise NodeFailure(
                f"MCP server {server!r}, tool {resolved['tool']!r}: {describe(exc)}"
            ) from None
        text = "".join(c.text for c in result.content if c.type == "text")
        structured = [result.structured_content] if result.structured_content is not None else []
        return NodeResult({"text": text, "json": structured, "files": [], "is_error": bool(result.is_error)})
