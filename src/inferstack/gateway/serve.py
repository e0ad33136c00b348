"""Run the gateway under uvicorn (uvloop + httptools) with the server start-up contract of
docs/architecture.md: binds 127.0.0.1 by default, accepts port 0, writes ``--ready-file`` once
serving, SIGTERM drains."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import socket
from pathlib import Path
from typing import Any

import uvicorn

from inferstack.config.schema import InferstackConfig
from inferstack.fileio import write_ready_file
from inferstack.gateway.server import Gateway
from inferstack.protocol.http_guard import guarded_protocol


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


def serve(cfg: InferstackConfig, ready_file: Path | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = cfg.gateway.host, cfg.gateway.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    app = Gateway(cfg, tracer_provider=make_tracer_provider(cfg))
    limits = cfg.gateway.http
    protocol = guarded_protocol(limits.max_header_bytes, limits.header_timeout_s)  # 431 / 408 (slowloris)
    config = uvicorn.Config(app, loop="uvloop", http=protocol, lifespan="on", access_log=False,
                            log_level="warning", timeout_graceful_shutdown=30, backlog=4096,
                            proxy_headers=False, server_header=False)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.02)
        h = f"[{host}]" if ":" in host else host
        write_ready_file(ready_file, {"urls": [f"http://{h}:{bound}"], "pid": os.getpid()})
        await task

    import uvloop

    uvloop.run(main())
