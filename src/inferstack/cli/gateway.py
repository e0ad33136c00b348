"""`inferstack gateway`: the OpenAI-compatible gateway over engine pools."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from inferstack.config import InferstackConfig

app = typer.Typer(help="OpenAI-compatible gateway: pools, routing, flow control, keys and budgets.",
                  no_args_is_help=True)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="inferstack.yaml with pools, models, keys, tenants.")] = None,
    backend: Annotated[list[str] | None, typer.Option(
        "--backend", "-b", help="Engine base URL (repeatable); builds one pool named `default` whose models "
        "are discovered from the engines' /v1/models. Pools from --config are kept.")] = None,
    routing: Annotated[str, typer.Option(help="Routing preset for --backend pools: default, gie, cache-aware, "
                                         "least-load, round-robin, power-of-two, latency.")] = "default",
    host: Annotated[str | None, typer.Option(
        help="Bind address (default 127.0.0.1 or the config's gateway.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (0 = any free port; default 8080 or the config's).")] = None,
    ready_file: Annotated[Path | None, typer.Option(
        help="Write {\"urls\": [...], \"pid\": N} here once serving.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, max=64, help="Gateway processes sharing the port (default 1 or the config's gateway.workers). "
        "Raise it when the gateway's one core is busy; see docs/gateway.md, Workers.")] = None,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics."""
    cfg = load_pools(config, backend or [], routing)
    given = {"host": host, "port": port, "workers": workers}
    gw = cfg.gateway.model_copy(update={k: v for k, v in given.items() if v is not None})
    cfg = cfg.model_copy(update={"gateway": gw})
    _check_workers(cfg)
    from inferstack.gateway.serve import BindError
    from inferstack.gateway.serve import serve as run

    try:
        status = run(cfg, ready_file)
    except BindError as exc:
        typer.echo(f"error: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(status)


def _check_workers(cfg: InferstackConfig) -> None:
    """--workers overrides the config after it was checked: check the combinations again."""
    from inferstack.config.workers import worker_problems

    problems = worker_problems(cfg)
    if problems:
        lines = "\n".join(f"  {'.'.join(map(str, loc))}: {msg}" for loc, msg in problems)
        typer.echo(f"error: invalid configuration for --workers {cfg.gateway.workers}:\n{lines}", err=True)
        raise typer.Exit(2)


def load_pools(config: Path | None, backend: list[str], routing: str) -> InferstackConfig:
    """``--config`` and/or ``--backend`` URLs (a pool named `default`) as one checked configuration;
    exits with status 2 and a precise message when it is invalid or has no pools."""
    from inferstack.config import ConfigError, InferstackConfig, load_config
    from inferstack.config.schema import PoolConfig

    if config is None and not backend:
        raise typer.BadParameter("give --config FILE or at least one --backend URL", param_hint="--config/--backend")
    try:
        cfg = load_config(config) if config else InferstackConfig()
        if backend:
            pools = dict(cfg.pools)
            pools["default"] = PoolConfig(endpoints=[{"url": u} for u in backend], routing=routing)
            cfg = cfg.model_copy(update={"pools": pools})
            problems = cfg.cross_check()
            if problems:
                raise ConfigError([f"--routing: {m}" for _, m in problems])
    except ConfigError as exc:
        typer.echo(f"error: invalid configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:  # pydantic errors for --backend URLs
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not cfg.pools:
        typer.echo("error: the configuration has no pools; add `pools:` or pass --backend URL", err=True)
        raise typer.Exit(2)
    return cfg


@app.command("hash-key")
def hash_key(key: Annotated[str, typer.Argument(help="The API key to store in `keys[].sha256`.")]) -> None:
    """Print the sha256 digest of an API key (keys are stored hashed in inferstack.yaml)."""
    from inferstack.gateway.auth import hash_key as h

    typer.echo(h(key))
