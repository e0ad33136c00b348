"""`inferstack agent serve`: the agents of a manifest behind a small HTTP API, what the Helm chart runs
as an agent's Deployment.

POST /v1/agents/{name}/run {"task": "..."} runs that agent to its answer and returns
{"agent", "answer", "steps": [...], "prompt_tokens", "completion_tokens"}; errors use the OpenAI error
envelope. GET /v1/agents lists the agents; GET /healthz answers ok.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from inferstack.agents.loop import AgentError, AgentRunner, RunSettings
from inferstack.agents.manifest import Bundle
from inferstack.workflow.chat import Gateway
from inferstack.workflow.mcp_pool import McpConnections
from inferstack.workflow.serve import error


@dataclass
class AgentService:
    bundle: Bundle
    gateway: Gateway
    mcp: McpConnections
    mcp_names: dict[tuple[str, str], str]
    settings: RunSettings


def build_app(service: AgentService) -> Starlette:
    async def run(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        agent = next((a for a in service.bundle.agents() if a.name == name), None)
        if agent is None:
            return error(f"no agent {name!r}", 404, "not_found_error")
        try:
            body = await request.json()
        except ValueError:
            return error("the body is not JSON", 400)
        task = body.get("task") if isinstance(body, dict) else None
        if not isinstance(task, str) or not task:
            return error("'task' (a non-empty string) is required", 400)
        runner = AgentRunner(service.bundle, service.gateway, service.mcp, service.settings, service.mcp_names)
        try:
            result = await runner.run(agent, task)
        except AgentError as exc:
            return error(str(exc), 502, "agent_error")
        return JSONResponse({"agent": name, "answer": result.answer,
                             "steps": [dataclasses.asdict(s) for s in result.steps],
                             "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens})

    async def agents(request: Request) -> JSONResponse:
        return JSONResponse({"data": [{"name": a.name, "namespace": a.namespace, "description": a.spec.description}
                                      for a in service.bundle.agents()]})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/v1/agents/{name}/run", run, methods=["POST"]),
                             Route("/v1/agents", agents), Route("/healthz", health)])
