"""`inferstack agent`: KAgent-style Agent manifests, validated offline and run over the gateway."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Run Kubernetes-native agents (KAgent `Agent` manifests, kagent.dev/v1alpha2) over the "
                  "inferstack gateway: a tool-calling loop with MCP tools and other agents as tools.",
                  no_args_is_help=True)


def _bundle(files: list[Path]) -> Any:
    from inferstack.agents.manifest import ManifestError, load_bundle

    try:
        return load_bundle(files)
    except ManifestError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _pick(bundle: Any, name: str | None) -> Any:
    agents = bundle.agents()
    if not agents:
        typer.echo(f"error: no kagent.dev/v1alpha2 Agent in {bundle.source}", err=True)
        raise typer.Exit(2)
    if name is None:
        return agents[0]
    chosen = [a for a in agents if a.name == name or f"{a.namespace}/{a.name}" == name]
    if not chosen:
        typer.echo(f"error: no agent {name!r}; agents: {', '.join(a.name for a in agents)}", err=True)
        raise typer.Exit(2)
    return chosen[0]


def _trace(step: Any) -> None:
    pad = "  " * step.depth
    detail = " ".join(step.detail.split())[:300]  # one line per step
    if step.kind == "model":
        typer.echo(f"{pad}[{step.agent} #{step.index}] model {step.name}: {step.detail} "
                   f"({step.tokens} tokens, {step.elapsed_ms:.0f} ms)", err=True)
    elif step.kind in ("tool", "agent"):
        mark = "✗" if step.is_error else "→"
        typer.echo(f"{pad}[{step.agent} #{step.index}] {step.kind} {step.name} {mark} {detail}", err=True)
    else:
        typer.echo(f"{pad}[{step.agent}] answer: {detail}", err=True)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="YAML manifests (Agent, ModelConfig, RemoteMCPServer, "
                                                "MCPServer; several documents per file are fine).")],
) -> None:
    """Check manifests offline with KAgent's rules; problems are printed as FILE:LINE and exit 2."""
    bundle = _bundle(files)
    kinds = sorted({r.kind for r in bundle.resources.values()})
    counts = ", ".join(f"{sum(r.kind == k for r in bundle.resources.values())} {k}" for k in kinds)
    typer.echo(f"ok: {counts or 'no kagent.dev resources'}")


GatewayOpt = Annotated[str | None, typer.Option(
    "--gateway", help="OpenAI-compatible base URL (default: the ModelConfig's openAI.baseUrl, $OPENAI_BASE_URL or "
                      "http://127.0.0.1:8000/v1).")]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key for the gateway (default $OPENAI_API_KEY).")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Use this model instead of the ModelConfig's.")]
MaxStepsOpt = Annotated[int, typer.Option("--max-steps", min=1, help="Model calls per agent before giving up.")]
FirstChoiceOpt = Annotated[str, typer.Option(
    "--first-tool-choice", help="tool_choice of each agent's first step: auto or required (small models rarely "
                                "call tools by themselves).")]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", help="Override the ModelConfig's temperature.")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Override the ModelConfig's maxTokens.")]
McpOpt = Annotated[list[str] | None, typer.Option(
    "--mcp", help="MCP server NAME=URL (Streamable HTTP) or NAME='COMMAND ARGS' (stdio), standing in for the "
                  "server of that name (repeatable).")]
FilesOpt = Annotated[list[Path] | None, typer.Option("--file", "-f", help="More manifests (repeatable).")]


@dataclass
class Setup:
    bundle: Any
    targets: dict[str, object]
    names: dict[tuple[str, str], str]
    settings: Any
    url: str
    api_key: str | None


def _setup(files: list[Path], mcp: list[str] | None, settings: Any, gateway: str | None, api_key: str | None,
           agent: str | None = None) -> tuple[Setup, Any]:
    from inferstack.agents.loop import mcp_targets
    from inferstack.cli.workflow import DEFAULT_GATEWAY, parse_mcp_option

    if settings.first_tool_choice not in ("auto", "required"):
        raise typer.BadParameter("expected auto or required", param_hint="--first-tool-choice")
    bundle = _bundle(files)
    chosen = _pick(bundle, agent)
    targets, names = mcp_targets(bundle, parse_mcp_option(mcp or []))
    url = gateway or _base_url(bundle, chosen) or os.environ.get("OPENAI_BASE_URL") or DEFAULT_GATEWAY
    return Setup(bundle, targets, names, settings, url, api_key or os.environ.get("OPENAI_API_KEY")), chosen


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="YAML with the Agent (and the agents, ModelConfigs and MCP servers "
                                         "it uses).")],
    task: Annotated[str, typer.Argument(help="What to ask the agent.")],
    also: FilesOpt = None,
    agent: Annotated[str | None, typer.Option(help="Which Agent to run (default: the first in FILE).")] = None,
    gateway: GatewayOpt = None, api_key: ApiKeyOpt = None, model: ModelOpt = None, max_steps: MaxStepsOpt = 8,
    first_tool_choice: FirstChoiceOpt = "auto", temperature: TemperatureOpt = None, max_tokens: MaxTokensOpt = None,
    mcp: McpOpt = None,
) -> None:
    """Run an agent on TASK: the trace on stderr, the answer as JSON on the last stdout line."""
    from inferstack.agents.loop import AgentError, AgentRunner, RunSettings
    from inferstack.workflow.chat import Gateway
    from inferstack.workflow.mcp_pool import McpConnections

    settings = RunSettings(max_steps, model, first_tool_choice, temperature, max_tokens)
    setup, chosen = _setup([file, *(also or [])], mcp, settings, gateway, api_key, agent)

    async def go() -> Any:
        import httpx

        pool = McpConnections(setup.targets)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
            gw = Gateway(client, setup.url, setup.api_key, "")
            try:
                return await AgentRunner(setup.bundle, gw, pool, settings, setup.names, _trace).run(chosen, task)
            finally:
                await pool.aclose()

    try:
        result = asyncio.run(go())
    except AgentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"agent": chosen.name, "answer": result.answer, "model_calls": sum(
        s.kind == "model" for s in result.steps), "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens}, ensure_ascii=False))


@app.command()
def serve(
    files: Annotated[list[Path], typer.Argument(help="Manifests with the agents to serve.")],
    gateway: GatewayOpt = None, api_key: ApiKeyOpt = None, model: ModelOpt = None, max_steps: MaxStepsOpt = 8,
    first_tool_choice: FirstChoiceOpt = "auto", temperature: TemperatureOpt = None, max_tokens: MaxTokensOpt = None,
    mcp: McpOpt = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = any free port).")] = 8091,
    ready_file: Annotated[Path | None,
                          typer.Option(help="Write {\"urls\": [...], \"pid\": N} here once serving.")] = None,
) -> None:
    """Serve the agents over HTTP: POST /v1/agents/NAME/run {"task": ...}, GET /v1/agents, GET /healthz."""
    from inferstack.agents.loop import RunSettings
    from inferstack.agents.serve import AgentService, build_app
    from inferstack.workflow.chat import Gateway
    from inferstack.workflow.mcp_pool import McpConnections
    from inferstack.workflow.serve import serve_app

    settings = RunSettings(max_steps, model, first_tool_choice, temperature, max_tokens)
    setup, _ = _setup(files, mcp, settings, gateway, api_key)

    async def go() -> None:
        import httpx

        pool = McpConnections(setup.targets)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
            service = AgentService(setup.bundle, Gateway(client, setup.url, setup.api_key, ""), pool, setup.names,
                                   settings)
            try:
                await serve_app(build_app(service), host, port, str(ready_file) if ready_file else None)
            finally:
                await pool.aclose()

    asyncio.run(go())


def _base_url(bundle: Any, agent: Any) -> str | None:
    config = bundle.get("ModelConfig", agent.spec.declarative.model_config_name, agent.namespace) \
        if agent.spec.declarative else None
    return config.spec.open_ai.base_url if config and config.spec.open_ai else None
