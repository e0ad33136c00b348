"""`inferstack workflow`: run Dify-format workflow files over an OpenAI-compatible gateway."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Run Dify-format workflows (DSL files exported from Dify) over the inferstack gateway.",
                  no_args_is_help=True)

DEFAULT_GATEWAY = "http://127.0.0.1:8000/v1"


def _load(file: Path, confirm_version: bool) -> Any:
    from inferstack.workflow.dsl import DslError, load_app

    try:
        loaded = load_app(file, confirm_pending=confirm_version)
    except DslError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for warning in loaded.warnings:
        typer.echo(f"warning: {warning}", err=True)
    return loaded


def _parse_inputs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"{pair!r}: expected NAME=VALUE", param_hint="--input")
        key, value = pair.split("=", 1)
        out[key] = value
    return out


def parse_mcp_option(pairs: list[str]) -> dict[str, object]:
    """NAME=URL (Streamable HTTP) or NAME=COMMAND ARGS... (stdio) → what `mcp.Client` connects to."""
    import shlex

    targets: dict[str, object] = {}
    for pair in pairs:
        name, sep, target = pair.partition("=")
        if not sep or not name or not target:
            raise typer.BadParameter(f"{pair!r}: expected NAME=URL or NAME=COMMAND", param_hint="--mcp")
        if target.startswith(("http://", "https://")):
            targets[name] = target
        else:
            from inferstack.workflow.mcp_pool import stdio_server

            argv = shlex.split(target)
            targets[name] = stdio_server(argv[0], argv[1:])
    return targets


def _services(client: Any, gateway: str | None, api_key: str | None, allow_host: list[str] | None,
              mcp: list[str] | None) -> Any:
    from inferstack.workflow.mcp_pool import McpConnections
    from inferstack.workflow.nodes import Services

    return Services(client=client, gateway=gateway or os.environ.get("OPENAI_BASE_URL") or DEFAULT_GATEWAY,
                    api_key=api_key or os.environ.get("OPENAI_API_KEY"), session_id="",
                    allow_hosts=frozenset(allow_host or []), mcp=McpConnections(parse_mcp_option(mcp or [])))


def _progress(event: dict[str, Any]) -> None:
    data = event["data"]
    kind = event["event"]
    if data.get("node_type") == "iteration-start":
        return
    if kind == "node_started":
        typer.echo(f"▶ {data['node_key']} ({data['node_type']})", err=True)
    elif kind == "node_finished":
        how = "resumed" if data.get("resumed") else "cache hit" if data.get("cache_hit") else (
            f"{data['elapsed_time'] * 1000:.0f} ms")
        tokens = f", {data['total_tokens']} tokens" if data.get("total_tokens") else ""
        typer.echo(f"✓ {data['node_key']} ({data['node_type']}) {how}{tokens}", err=True)
    elif kind == "node_retry":
        typer.echo(f"↻ {data['node_id']} attempt {data['attempt']} failed: {data['error']}", err=True)
    elif kind == "workflow_started":
        typer.echo(f"run {event['workflow_run_id']}", err=True)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Dify DSL file (app.yml) with app.mode workflow or advanced-chat.")],
    input: Annotated[list[str] | None,
                     typer.Option("--input", "-i", help="Start-node input NAME=VALUE (repeatable).")] = None,
    gateway: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL for LLM nodes (default "
                                                "$OPENAI_BASE_URL or http://127.0.0.1:8000/v1).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for the gateway (default $OPENAI_API_KEY).")] = None,
    model: Annotated[str | None,
                     typer.Option(help="Serve every LLM node with this model instead of the DSL's.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not reuse cached step results.")] = False,
    allow_host: Annotated[list[str] | None, typer.Option(help="Host http-request nodes may call (repeatable); "
                                                         "none by default.")] = None,
    mcp: Annotated[list[str] | None, typer.Option(help="MCP server for tool nodes whose provider_id is NAME: "
                                                  "NAME=URL (Streamable HTTP) or NAME='COMMAND ARGS' (stdio); "
                                                  "repeatable.")] = None,
    db: Annotated[Path | None, typer.Option(help="Run store (default $INFERSTACK_WORKFLOW_DB or "
                                            "~/.local/state/inferstack/workflows.sqlite).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Id for the new run (default: random).")] = None,
    resume: Annotated[str | None, typer.Option(help="Resume this run id: finished nodes are not re-run.")] = None,
    confirm_version: Annotated[bool, typer.Option(help="Import a DSL whose version needs confirmation "
                                                  "(newer than ours or an older major).")] = False,
) -> None:
    """Run FILE; progress per node on stderr, the final outputs as JSON on the last stdout line."""
    from inferstack.workflow.inputs import InputError
    from inferstack.workflow.runner import Runner, WorkflowError
    from inferstack.workflow.store import RunStore, default_db_path

    loaded = _load(file, confirm_version)
    inputs = _parse_inputs(input or [])
    store = RunStore(db or default_db_path())

    async def go() -> Any:
        import httpx

        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
            svc = _services(client, gateway, api_key, allow_host, mcp)
            runner = Runner(loaded, store, svc, use_cache=not no_cache, on_event=_progress, model=model)
            try:
                return await runner.run(inputs, run_id=resume or run_id, resume=resume is not None)
            finally:
                await svc.mcp.aclose()

    try:
        outcome = asyncio.run(go())
    except (WorkflowError, InputError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    typer.echo(json.dumps(outcome.outputs, ensure_ascii=False))


@app.command()
def export(
    file: Annotated[Path, typer.Argument(help="Dify DSL file to check and write back.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
    confirm_version: Annotated[bool, typer.Option(help="Accept a DSL version that needs confirmation.")] = False,
) -> None:
    """Import FILE with Dify's rules (errors as FILE:LINE) and export it back as Dify DSL."""
    from inferstack.workflow.dsl import export_app

    text = export_app(_load(file, confirm_version))
    if out:
        out.write_text(text)
    else:
        typer.echo(text, nl=False)


@app.command()
def serve(
    file: Annotated[Path, typer.Argument(help="Dify DSL file (app.yml) to serve.")],
    gateway: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL for LLM nodes (default "
                                                "$OPENAI_BASE_URL or http://127.0.0.1:8000/v1).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for the gateway (default $OPENAI_API_KEY).")] = None,
    model: Annotated[str | None,
                     typer.Option(help="Serve every LLM node with this model instead of the DSL's.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not reuse cached step results.")] = False,
    allow_host: Annotated[list[str] | None, typer.Option(help="Host http-request nodes may call (repeatable).")] = None,
    mcp: Annotated[list[str] | None,
                   typer.Option(help="MCP server for tool nodes: NAME=URL or NAME='COMMAND ARGS'.")] = None,
    db: Annotated[Path | None, typer.Option(help="Run store (default $INFERSTACK_WORKFLOW_DB or "
                                            "~/.local/state/inferstack/workflows.sqlite).")] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = any free port).")] = 8090,
    ready_file: Annotated[Path | None,
                          typer.Option(help="Write {\"urls\": [...], \"pid\": N} here once serving.")] = None,
    confirm_version: Annotated[bool, typer.Option(help="Accept a DSL version that needs confirmation.")] = False,
) -> None:
    """Serve FILE over HTTP: POST /v1/workflows/run (SSE events or blocking), GET /v1/workflows/run/ID,
    GET /v1/workflows/runs."""
    from inferstack.workflow.serve import ServeState
    from inferstack.workflow.serve import serve as run_server
    from inferstack.workflow.store import RunStore, default_db_path

    loaded = _load(file, confirm_version)
    store = RunStore(db or default_db_path())

    async def go() -> None:
        import httpx

        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
            state = ServeState(loaded, store, _services(client, gateway, api_key, allow_host, mcp),
                               not no_cache, model)
            try:
                await run_server(state, host, port, str(ready_file) if ready_file else None)
            finally:
                await state.services.mcp.aclose()

    try:
        asyncio.run(go())
    finally:
        store.close()
