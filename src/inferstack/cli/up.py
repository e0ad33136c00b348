"""`inferstack up`: the whole local stack — engine replicas, the gateway, a live dashboard — in one command."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from inferstack.stack.settings import UpSettings


def _load_settings(config: Path | None) -> UpSettings:
    if config is None:
        return UpSettings()
    from inferstack.stack.config_section import load_up_settings

    return load_up_settings(config)


def _pd_override(base: UpSettings, prefill: int | None, decode: int | None) -> dict[str, int] | None:
    """--prefill/--decode on top of the file's `up.pd`; both are needed unless the file sets the other."""
    if prefill is None and decode is None:
        return None
    pd = base.pd.model_dump() if base.pd else {}
    pd.update({k: v for k, v in {"prefill": prefill, "decode": decode}.items() if v is not None})
    if "prefill" not in pd or "decode" not in pd:
        raise ValueError("--prefill and --decode go together (e.g. --prefill 1 --decode 1)")
    return pd


def _autoscale_override(base: UpSettings, policy: str | None, low: int | None, high: int | None,
                        idle: float | None) -> dict[str, object] | None:
    """--autoscale/--min-replicas/--max-replicas/--scale-to-zero-after on top of the file's `up.autoscale`."""
    given = {k: v for k, v in {"policy": policy, "min_replicas": low, "max_replicas": high, "idle_s": idle}.items()
             if v is not None}
    if not given:
        return None
    auto = base.autoscale.model_dump(exclude_unset=True) if base.autoscale else {}
    if "policy" not in auto and policy is None:
        raise ValueError("--min-replicas, --max-replicas and --scale-to-zero-after need --autoscale POLICY "
                         "(e.g. --autoscale kpa:target=8)")
    return {**auto, **given}


def up(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="inferstack.yaml; its `up` section sets the defaults below.")] = None,
    replicas: Annotated[int | None, typer.Option(
        "--replicas", "-n", min=1, help="Engine replicas (default 2).")] = None,
    prefill: Annotated[int | None, typer.Option(
        "--prefill", help="Prefill/decode disaggregation (xPyD): this many engines with --role prefill; "
        "give --decode too.")] = None,
    decode: Annotated[int | None, typer.Option(
        "--decode", help="xPyD: this many engines with --role decode, behind a PD pool in the gateway.")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", "-p", min=0, max=65535, help="Gateway port (default 8000; 0 = any free port).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model to serve: alias (smollm2-135m), .gguf file, HF directory or oci:// "
        "reference.")] = None,
    emulate: Annotated[str | None, typer.Option(
        "--emulate", help="Emulated engines instead of a real model, e.g. h100:llama-3-8b.")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, help="Torch threads per engine (default: cores split between replicas).")] = None,
    host: Annotated[str | None, typer.Option(
        "--host", help="Address the gateway binds (default 127.0.0.1).")] = None,
    kv_tiers: Annotated[str | None, typer.Option(
        "--kv-tiers", help="Reuse KV across requests and replicas: any of host,disk,redis, fastest first. The "
        "replicas share a disk tier in the log directory and a Redis server that up starts (unless up.kv in "
        "--config names them); see docs/kv-cache.md.")] = None,
    kv_transport: Annotated[str | None, typer.Option(
        "--kv-transport", help="With --prefill/--decode or --kv-reuse: how engines move KV, auto|nixl|tcp|shm "
        "(default auto: NIXL over UCX when installed and UCX starts, else shared memory); see "
        "docs/disaggregation.md.")] = None,
    kv_reuse: Annotated[bool | None, typer.Option(
        "--kv-reuse/--no-kv-reuse", help="Cross-replica KV reuse: a replica READs a prompt prefix another replica "
        "holds (over NIXL) instead of computing it; the gateway learns who holds what from the engines' KV "
        "events (default: up.kv_reuse in --config, else off); see docs/disaggregation.md.")] = None,
    with_prometheus: Annotated[bool, typer.Option(
        "--with-prometheus", help="Also start Prometheus scraping the stack, with inferstack's recording and "
        "alert rules.")] = False,
    log_dir: Annotated[Path | None, typer.Option(
        "--log-dir", help="Directory for child logs and state.json (default: a new temp dir).")] = None,
    ready_file: Annotated[Path | None, typer.Option(
        "--ready-file", help="Write one JSON line with the URLs here once everything is ready.")] = None,
    autoscale: Annotated[str | None, typer.Option(
        "--autoscale", help="Scale the replicas with a policy: POLICY[:key=value,...], e.g. kpa:target=8 (8 "
        "requests in flight per replica) or slo:ttft_p95=1s,tpot_p95=100ms; policies hpa, kpa, apa, slo, "
        "planner (docs/autoscaling.md). --replicas is then the count at start.")] = None,
    min_replicas: Annotated[int | None, typer.Option(
        "--min-replicas", min=0, help="With --autoscale: fewest replicas (default 1); 0 scales to zero when idle "
        "and holds requests at the gateway until a replica is ready (the stack starts with none unless the model "
        "is an oci:// reference or needs --trust-policy).")] = None,
    max_replicas: Annotated[int | None, typer.Option(
        "--max-replicas", min=1, help="With --autoscale: most replicas (default 4).")] = None,
    scale_to_zero_after: Annotated[float | None, typer.Option(
        "--scale-to-zero-after", min=0.1, help="With --min-replicas 0: seconds without requests before the "
        "last replica stops (default 300).")] = None,
) -> None:
    """Start a working local stack: engine replicas serving a model behind the OpenAI-compatible gateway.

    With no options: 2 CPU replicas of smollm2-135m and the gateway on http://127.0.0.1:8000.

    Live dashboard at /dashboard. Ctrl-C stops everything; a crashed engine leaves the pool and restarts with backoff.

    Examples:

    inferstack up

    inferstack up --replicas 1 --port 9000

    inferstack up --emulate h100:llama-3-8b --replicas 8

    inferstack up --prefill 1 --decode 2

    inferstack up --kv-tiers host,redis

    inferstack up --with-prometheus

    inferstack up --emulate h100:llama-3-8b --autoscale kpa:target=8 --min-replicas 0 --max-replicas 4
    """
    from pydantic import ValidationError

    from inferstack.stack.preflight import PreflightError
    from inferstack.stack.progress import Reporter
    from inferstack.stack.supervisor import Supervisor

    reporter = Reporter()
    try:
        base = _load_settings(config)
        pd = _pd_override(base, prefill, decode)
        auto = _autoscale_override(base, autoscale, min_replicas, max_replicas, scale_to_zero_after)
        overrides = {k: v for k, v in {
            "replicas": replicas, "port": port, "model": model, "emulate": emulate, "threads": threads,
            "host": host, "log_dir": str(log_dir) if log_dir else None, "pd": pd, "kv_transport": kv_transport,
            "autoscale": auto, "kv_reuse": kv_reuse,
            "kv": ({**(base.kv.model_dump(exclude_unset=True) if base.kv else {}), "tiers": kv_tiers}
                   if kv_tiers else None),
        }.items() if v is not None}
        if with_prometheus:
            overrides["with_prometheus"] = True
        # exclude_unset: a pd from the CLI must not clash with the replica count derived from the file's pd
        settings = UpSettings.model_validate({**base.model_dump(exclude_unset=True), **overrides})
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "up"
            reporter.error(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        raise typer.Exit(2) from None
    except ValueError as e:  # config file errors carry file:line
        reporter.error(str(e))
        raise typer.Exit(2) from None
    try:
        code = asyncio.run(Supervisor(settings, reporter, ready_file=ready_file, config_file=config).run())
    except PreflightError as e:
        reporter.error(str(e))
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
