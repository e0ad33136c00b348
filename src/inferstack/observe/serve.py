"""The observe HTTP side: `/metrics` (Prometheus text) and the live dashboard at `/dashboard`, which
charts the eBPF metrics exactly as it charts the gateway's (same names; docs/observe.md)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from inferstack.telemetry.dashboard import dashboard_app, scraping_state_provider


class MetricsServer:
    """uvicorn on a background thread (observe's main thread waits on bpftrace and signals)."""

    def __init__(self, registry: CollectorRegistry, port: int, title: str) -> None:
        def exposition() -> str:
            return generate_latest(registry).decode()

        async def metrics(request: Request) -> Response:
            return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

        provider = scraping_state_provider(exposition, lambda: [])
        app = Starlette(routes=[Route("/metrics", metrics),
                                Mount("/dashboard", app=dashboard_app(provider, title=title))])
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="observe-http", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the metrics server did not start on 127.0.0.1:{self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
