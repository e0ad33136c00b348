"""`inferstack epp`: the Gateway API Inference Extension endpoint picker (Envoy ext_proc)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inferstack.cli.gateway import load_pools

app = typer.Typer(help="Endpoint picker for Envoy-based Kubernetes gateways (Gateway API Inference Extension): "
                  "Envoy asks it, over ext_proc gRPC, which pod serves each request.", no_args_is_help=True)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="inferstack.yaml with pools, models, keys, "
                                                "tenants (the same file `gateway serve` reads).")] = None,
    pool: Annotated[str | None, typer.Option(help="The pool to pick for (an InferencePool is one pool); needed "
                                             "when the config has several. Default: the config's epp.pool.")] = None,
    backend: Annotated[list[str] | None, typer.Option(
        "--backend", "-b", help="Engine base URL, e.g. http://10.0.0.7:8000 (repeatable): one pool named "
        "`default`. Envoy connects to the host:port of each URL.")] = None,
    routing: Annotated[str, typer.Option(help="Routing preset for --backend pools: default, gie, cache-aware, "
                                         "least-load, round-robin, power-of-two, latency.")] = "default",
    host: Annotated[str | None, typer.Option(help="Bind address for all three ports (default 127.0.0.1; "
                                             "0.0.0.0 in a pod).")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC ext_proc port (default 9002; 0 = any free port).")] = None,
    health_port: Annotated[int | None, typer.Option(help="gRPC health port (default 9003).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port (default 9090).")] = None,
    conformance_hooks: Annotated[bool, typer.Option(
        help="Honour the GIE conformance headers (test-epp-endpoint-selection, "
        "x-conformance-test-served-endpoint). For conformance tests only.")] = False,
    ready_file: Annotated[Path | None, typer.Option(help="Write {\"urls\": [...], \"grpc\", \"health\", "
                                                    "\"metrics\", \"pid\"} here once serving.")] = None,
) -> None:
    """Serve envoy.service.ext_proc.v3.ExternalProcessor and grpc.health.v1 (liveness, readiness)."""
    from inferstack.epp.service import single_pool

    cfg = load_pools(config, backend or [], routing)
    try:
        cfg, name = single_pool(cfg, pool or cfg.epp.pool or ("default" if backend else None))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    given = {"host": host, "port": port, "health_port": health_port, "metrics_port": metrics_port,
             "conformance_hooks": conformance_hooks or None}
    epp = cfg.epp.model_copy(update={k: v for k, v in given.items() if v is not None})
    cfg = cfg.model_copy(update={"epp": epp})
    import logging

    import uvloop

    from inferstack.epp.service import run
    from inferstack.gateway.serve import make_tracer_provider

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(run(cfg, name, ready_file, make_tracer_provider(cfg)))
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
