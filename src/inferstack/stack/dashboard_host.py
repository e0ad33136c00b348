"""Serve the dashboard from the supervisor when the gateway does not mount one itself."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route

from inferstack.telemetry.dashboard import EndpointLister, dashboard_app, scraping_state_provider


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the supervisor's loop: the supervisor owns SIGINT/SIGTERM, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def start_dashboard(gateway_metrics_url: str, endpoints: EndpointLister,
                          host: str = "127.0.0.1") -> tuple[Any, str]:
    """Start on a free port; returns (server, dashboard URL). Set `server.should_exit` to stop it."""
    provider = scraping_state_provider(gateway_metrics_url, endpoints)
    app = Starlette(routes=[
        Route("/", lambda request: RedirectResponse("/dashboard/")),
        Mount("/dashboard", app=dashboard_app(provider)),
    ])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = _EmbeddedServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    server.task = task  # type: ignore[attr-defined]  # keep a reference so the task is not collected
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    port = sock.getsockname()[1]
    return server, f"http://{host}:{port}/dashboard/"
