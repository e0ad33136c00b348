"""Run the gateway on uvloop under uvicorn (the process: sockets, lifespan, signals, drain) with our HTTP front
(`protocol/http_front.py`: every connection and request) and the server start-up contract of
docs/architecture.md: binds 127.0.0.1 by default, accepts port 0, writes ``--ready-file`` once
serving, SIGTERM drains."""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from inferstack.config.schema import InferstackConfig
from inferstack.fileio import write_ready_file
from inferstack.gateway.server import Gateway
from inferstack.protocol.http_guard import guarded_protocol
from inferstack.protocol.http_limits import KEEP_ALIVE_S


def make_tracer_provider(cfg: InferstackConfig) -> Any:
    tr = cfg.gateway.tracing
    if tr.exporter == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "inferstack-gateway"}))
    if tr.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            try:
                importlib.metadata.version("opentelemetry-exporter-otlp-proto-http")
            except importlib.metadata.PackageNotFoundError:
                raise RuntimeError("tracing.exporter: otlp needs "
                                   "`pip install opentelemetry-exporter-otlp-proto-http`") from exc
            # installed but broken: xds-protos (the endpoint picker's protos) overwrote opentelemetry-proto
            raise RuntimeError(f"tracing.exporter: otlp cannot load ({exc}); restore opentelemetry-proto's "
                               "files: `pip install --force-reinstall --no-deps opentelemetry-proto`"
                               ) from exc
        exporter = OTLPSpanExporter(endpoint=tr.endpoint) if tr.endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def serve(cfg: InferstackConfig, ready_file: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status. ``gateway.workers`` > 1 forks that many
    worker processes on one port (`gateway/workers.py`); this process then only supervises them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.gateway.workers > 1:
        from inferstack.gateway.workers import run_workers

        return run_workers(cfg, ready_file)
    host = cfg.gateway.host
    sock = bind_socket(host, cfg.gateway.port, reuse_port=False)
    bound = sock.getsockname()[1]
    h = f"[{host}]" if ":" in host else host
    run_server(Gateway(cfg, tracer_provider=make_tracer_provider(cfg)), [sock],
               lambda: write_ready_file(ready_file, {"urls": [f"http://{h}:{bound}"], "pid": os.getpid()}))
    return 0


# Collect the young generation every this many net allocations of container objects (CPython: 700).
# A request allocates a few hundred short-lived objects and at 64 concurrent requests the number alive
# swings by thousands, so at 700 a collection ran every ~27 requests (about 10 µs of CPU per request)
# and, through them, full collections of the whole heap (50 ms each, a pause every request in flight
# waits out; 15 µs per request). Measured: docs/gateway.md, "What a request costs".
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Once serving: the start-up heap (modules, config, schemas) leaves the collector's view for good
    (`gc.freeze`), and the young generation is collected every `GC_GEN0_THRESHOLD` allocations."""
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


class BindError(OSError):
    """The gateway's address cannot be bound (in use, no permission); the CLI prints it, no traceback."""


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to (host, port); with ``reuse_port`` several processes bind the same port
    and the kernel spreads connections over those listening on it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BindError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror} (pick another --port, "
                                   "or 0 for any free port)") from None
    return sock


def server_config(app: Gateway) -> uvicorn.Config:
    """uvicorn's settings for the gateway. ``proxy_headers=False`` also keeps uvicorn's proxy-headers middleware
    out: with any middleware around the app our HTTP front cannot reach the app's ``direct_post`` handlers, and
    every completion would take the slower ASGI path (`http_front.FrontProtocol`)."""
    limits = app.cfg.gateway.http
    protocol = guarded_protocol(limits.max_header_bytes, limits.header_timeout_s)  # 431 / 408 (slowloris)
    return uvicorn.Config(app, loop="uvloop", http=protocol, lifespan="on", access_log=False,
                          log_level="warning", timeout_graceful_shutdown=30, backlog=4096,
                          proxy_headers=False, server_header=False, timeout_keep_alive=KEEP_ALIVE_S)


def run_server(app: Gateway, sockets: list[socket.socket], on_ready: Callable[[], object]) -> None:
    """uvicorn (uvloop, our HTTP front with its header guards) serving ``app`` on ``sockets``; ``on_ready``
    runs once it serves. Returns after SIGTERM/SIGINT and the graceful drain."""
    server = uvicorn.Server(server_config(app))

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=sockets))
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.02)
        tune_gc()
        on_ready()
        await task

    import uvloop

    uvloop.run(main())
