"""`inferstack workflow serve`: one workflow app behind an HTTP API shaped like Dify's workflow API.

POST /v1/workflows/run {"inputs": {...}, "response_mode": "streaming" | "blocking"} starts a run;
streaming answers with SSE frames in Dify's event shapes (workflow_started, node_started,
node_finished, workflow_finished); blocking answers once with the finished run.
GET /v1/workflows/run/{id} is one run with its nodes; GET /v1/workflows/runs lists runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from inferstack.protocol.http_limits import KEEP_ALIVE_S
from inferstack.protocol.sse import sse_event
from inferstack.workflow.dsl import App
from inferstack.workflow.inputs import InputError
from inferstack.workflow.nodes import Services
from inferstack.workflow.runner import Event, Runner, WorkflowError
from inferstack.workflow.runview import render_html
from inferstack.workflow.store import RunStore


@dataclass
class ServeState:
    app: App
    store: RunStore
    services: Services
    use_cache: bool
    model: str | None


def error(message: str, status: int, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def build_app(state: ServeState) -> Starlette:
    async def start_run(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return error("the body must be JSON: {\"inputs\": {...}, \"response_mode\": ...}", 400)
        if not isinstance(body, dict) or not isinstance(body.get("inputs", {}), dict):
            return error("`inputs` must be an object", 400)
        mode = body.get("response_mode", "streaming")
        if mode not in ("streaming", "blocking"):
            return error("`response_mode` must be streaming or blocking", 400)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        runner = Runner(state.app, state.store, state.services, state.use_cache, queue.put_nowait, state.model)
        task = asyncio.create_task(runner.run(body.get("inputs", {})))
        first = await _first_event(queue, task)
        if isinstance(first, Response):
            return first
        if mode == "blocking":
            with contextlib.suppress(WorkflowError):
                await task
            finished = next(e for e in _drain(queue) if e["event"] == "workflow_finished")
            return JSONResponse({"workflow_run_id": first["workflow_run_id"], **finished})
        return StreamingResponse(_stream(first, queue), media_type="text/event-stream")

    async def get_run(request: Request) -> Response:
        detail = state.store.run_detail(request.path_params["run_id"])
        return JSONResponse(detail) if detail else error("no such run", 404)

    async def list_runs(request: Request) -> Response:
        return JSONResponse({"data": state.store.run_summaries()})

    async def health(request: Request) -> Response:
        return Response("ok")

    async def run_page(request: Request) -> Response:
        detail = state.store.run_detail(request.path_params["run_id"])
        if detail is None:
            return HTMLResponse("<p>no such run</p>", 404)
        return HTMLResponse(render_html(state.app, detail))

    async def runs_page(request: Request) -> Response:
        items = "".join(f"<li><a href='runs/{html.escape(r['run_id'])}'>{html.escape(r['run_id'])}</a> "
                        f"{html.escape(r['status'])}</li>" for r in state.store.run_summaries())
        return HTMLResponse(f"<!doctype html><html><body><h1>{html.escape(state.app.name)} runs</h1>"
                            f"<ul>{items}</ul></body></html>")

    return Starlette(routes=[
        Route("/v1/workflows/run", start_run, methods=["POST"]),
        Route("/v1/workflows/run/{run_id}", get_run), Route("/v1/workflows/runs", list_runs),
        Route("/health", health), Route("/runs", runs_page), Route("/runs/{run_id}", run_page)])


async def _first_event(queue: asyncio.Queue[Event], task: asyncio.Task[Any]) -> Event | Response:
    """workflow_started, or a 400 when the inputs were refused before the run began."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    exc = task.exception()
    if isinstance(exc, InputError | WorkflowError):
        return error(str(exc), 400)
    raise exc or RuntimeError("the run ended without events")


def _drain(queue: asyncio.Queue[Event]) -> list[Event]:
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


async def _stream(first: Event, queue: asyncio.Queue[Event]) -> AsyncIterator[bytes]:
    yield sse_event(first)
    while True:
        event = await queue.get()
        yield sse_event(event)
        if event["event"] == "workflow_finished":
            return


async def serve(state: ServeState, host: str, port: int, ready_file: str | None) -> None:
    await serve_app(build_app(state), host, port, ready_file)


async def serve_app(app: Starlette, host: str, port: int, ready_file: str | None) -> None:
    """Serve ``app`` with uvicorn on host:port (0 = any free port); the ready file names the URL."""
    import uvicorn

    from inferstack.engine.server import _bind, server_url
    from inferstack.fileio import write_ready_file

    sock = _bind(host, port)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if server.started:
        write_ready_file(ready_file, {"urls": [server_url(host, sock.getsockname()[1])], "pid": os.getpid()})
    await serving

