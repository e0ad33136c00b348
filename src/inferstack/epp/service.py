"""The gRPC side of the picker: the ExternalProcessor service, gRPC health and the server's life.

Health (``grpc.health.v1``): ``liveness`` is SERVING while the process runs; ``readiness`` and
``envoy.service.ext_proc.v3.ExternalProcessor`` are SERVING only while the pool has at least one
ready endpoint (Envoy's gRPC health check on the ext_proc port reads the latter) and, with
`epp.leader_election`, only on the replica that holds the Lease (`kube/lease.py`): followers stay
NOT_SERVING until the leader stops renewing. Without it every replica is active and routes with its
own view of the pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import start_http_server

from inferstack.config.schema import InferstackConfig
from inferstack.epp.leader import leader_elector
from inferstack.epp.stream import EndpointPicker, Stream, decision_histogram
from inferstack.gateway.kvreuse import DirectReads
from inferstack.gateway.pd import PDLegs
from inferstack.gateway.pipeline import Pipeline
from inferstack.kube.lease import LeaderElector

log = logging.getLogger("inferstack.epp")

EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# grpc's default SO_REUSEPORT lets a second process bind the same port silently: refuse instead
_OPTIONS = [("grpc.so_reuseport", 0)]


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, picker: EndpointPicker):
        self.picker = picker

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        stream = Stream(self.picker)
        try:
            while (msg := await context.read()) is not grpc.aio.EOF:
                try:
                    out = await stream.handle(msg)
                except Exception:  # answered, not raised: Envoy would make a raised error a bare 500
                    out = await stream.failed(msg)
                for resp in out:
                    await context.write(resp)
        finally:
            await stream.abandon()


async def _track_readiness(
    health: health_aio.HealthServicer, pipeline: Pipeline, stop: asyncio.Event, elector: LeaderElector | None
) -> None:
    last = None
    while not stop.is_set():
        why = pipeline.not_ready_reason()
        if why is None and elector is not None and not elector.is_leader:
            why = "following: another replica holds the leader lease"
        ready = why is None
        if ready != last:
            for service in ("readiness", EXT_PROC):
                await health.set(service, _SERVING if ready else _NOT_SERVING)
            log.info("readiness: %s", "SERVING" if ready else f"NOT_SERVING ({why})")
            last = ready
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


def _bind(server: grpc.aio.Server, host: str, port: int) -> int:
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port} (in use?)")
    return bound


async def run(cfg: InferstackConfig, pool: str, ready_file: Path | None, tracer_provider: Any = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain open streams (bounded) and exit."""
    ep = cfg.epp
    pipeline = Pipeline(cfg, tracer_provider)
    picker = EndpointPicker(
        pipeline, pipeline.pools[pool], ep.conformance_hooks, decision_histogram(pipeline.metrics.registry),
        pd=PDLegs(pipeline.metrics.registry, cfg.gateway), reads=DirectReads(pipeline.metrics.registry),
        fallbacks=ep.fallback_endpoints,
    )
    health = health_aio.HealthServicer()
    await health.set("liveness", _SERVING)
    for service in ("readiness", EXT_PROC):
        await health.set(service, _NOT_SERVING)
    main = grpc.aio.server(options=_OPTIONS)
    pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(picker), main)
    health_pb2_grpc.add_HealthServicer_to_server(health, main)
    side = grpc.aio.server(options=_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health, side)
    port, hport = _bind(main, ep.host, ep.port), _bind(side, ep.host, ep.health_port)
    httpd, _ = start_http_server(ep.metrics_port, ep.host, registry=pipeline.metrics.registry)
    elector = leader_elector(cfg, pool)
    if elector is not None:  # only the leader scales Deployments (`kubernetes.autoscale`)
        pipeline.leading = lambda: elector.is_leader
    await pipeline.open()
    await main.start()
    await side.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    election = asyncio.create_task(elector.run(stop)) if elector is not None else None
    tracker = asyncio.create_task(_track_readiness(health, pipeline, stop, elector))
    h = f"[{ep.host}]" if ":" in ep.host else ep.host
    line = json.dumps(
        {
            "urls": [f"grpc://{h}:{port}", f"grpc://{h}:{hport}", f"http://{h}:{httpd.server_port}"],
            "grpc": f"{h}:{port}",
            "health": f"{h}:{hport}",
            "metrics": f"http://{h}:{httpd.server_port}",
            "pool": pool,
            "pid": os.getpid(),
        }
    )
    print(line, flush=True)
    if ready_file is not None:
        ready_file.write_text(line + "\n")
    await stop.wait()
    log.info("draining: readiness NOT_SERVING, waiting for open streams")
    await health.enter_graceful_shutdown()
    await tracker
    if election is not None:
        await election  # releases the lease, so a follower takes over at its next retry
    await main.stop(grace=30)
    await side.stop(grace=1)
    httpd.shutdown()
    await pipeline.aclose()


def single_pool(cfg: InferstackConfig, name: str | None) -> tuple[InferstackConfig, str]:
    """The configuration narrowed to the one pool this picker serves (an InferencePool is one pool):
    other pools go, and `models:` keep only their targets in it. Raises ValueError naming the choices."""
    names = list(cfg.pools)
    if name is None:
        if len(names) != 1:
            raise ValueError(f"the configuration has pools {', '.join(names)}: name one with --pool")
        name = names[0]
    if name not in cfg.pools:
        raise ValueError(f"unknown pool {name!r}; configured: {', '.join(names) or 'none'}")
    models = {}
    for alias, model in cfg.models.items():
        targets = [t for t in model.targets if t.pool == name]
        if targets:
            models[alias] = model.model_copy(update={"targets": targets})
    # Envoy routes only to the InferencePool's pods, so a picker cannot spill over to another pool
    pool = cfg.pools[name].model_copy(update={"spillover": None})
    return cfg.model_copy(update={"pools": {name: pool}, "models": models}), name
