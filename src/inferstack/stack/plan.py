"""Turn `UpSettings` into child specs (pure: no processes, no I/O)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from inferstack.stack.children import ChildSpec
from inferstack.stack.settings import UpSettings, usable_cores


def _inferstack(python: str, *args: str) -> tuple[str, ...]:
    return (python, "-m", "inferstack", *args)


def _port_flag(port: int) -> list[str]:
    return ["--port", str(port)]


def _format_args(settings: UpSettings) -> list[str]:
    """`up.dtype` / `up.quantization` / `up.kv_cache_dtype` as engine flags, only when set (older engines
    lack them)."""
    args = [] if settings.dtype == "auto" else ["--dtype", settings.dtype]
    args += [] if settings.kv_cache_dtype == "auto" else ["--kv-cache-dtype", settings.kv_cache_dtype]
    return args + ([] if settings.quantization == "none" else ["--quantization", settings.quantization])


def engine_specs(settings: UpSettings, python: str = sys.executable, log_dir: str = ".",
                 redis_url: str | None = None) -> list[ChildSpec]:
    """N real replicas (cores split between them), or one emulator process serving N endpoints (one
    per role for PD). KV tiers default to a disk tier in ``log_dir`` and the Redis server at
    ``redis_url`` that the supervisor started."""
    if settings.emulate:
        groups = ([("engine-emulated", None, settings.replicas)] if settings.pd is None else
                  [("prefill", "prefill", settings.pd.prefill), ("decode", "decode", settings.pd.decode)])
        return [ChildSpec(name=name, kind="engine", port_args=_port_flag, role=role, argv=_inferstack(
                    python, "engine", "serve", "--emulate", settings.emulate, "--emulate-count", str(count),
                    *(["--role", role] if role else []), *settings.engine_args))
                for name, role, count in groups]
    threads = settings.threads_per_engine()
    specs = []
    roles = settings.roles()
    for i, role in enumerate(roles):
        kv_args = (settings.kv.store_config(str(Path(log_dir) / "kv-disk"), redis_url).engine_args()
                   if settings.kv else [])
        # The role is part of the argv, so a restarted engine comes back with the same role.
        role_args = ["--role", role] if role else []
        if (role or settings.kv_reuse) and settings.kv_transport != "auto":
            role_args += ["--kv-transport", settings.kv_transport]
        if settings.kv_reuse:    # the engine reports the ports it got in its ready file (`reuse_gateway_config`)
            role_args += ["--kv-reuse", "--kv-transfer-port", "0", "--kv-events-endpoint", "tcp://127.0.0.1:0"]
        argv = _inferstack(python, "engine", "serve", "--model", settings.model,
                           "--threads", str(threads), *_format_args(settings), *role_args, *kv_args,
                           *settings.engine_args)
        specs.append(ChildSpec(
            name=_engine_name(role, i - roles.index(role)), kind="engine", argv=argv, port_args=_port_flag,
            # torch reads these at import; keep BLAS pools from oversubscribing the split cores.
            env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
            role=role,
        ))
    return specs


def replica_spec(settings: UpSettings, index: int, python: str = sys.executable) -> ChildSpec:
    """One colocated replica as its own process, `engine-{index}`: what the local autoscaler starts
    and stops one at a time (an emulated replica too, unlike `engine_specs`' one multi-endpoint process)."""
    if settings.emulate:
        argv = _inferstack(python, "engine", "serve", "--emulate", settings.emulate, *settings.engine_args)
        return ChildSpec(name=_engine_name(None, index), kind="engine", argv=argv, port_args=_port_flag)
    threads = settings.threads or max(1, usable_cores() // max(1, settings.autoscale.max_replicas
                                                                 if settings.autoscale else settings.replicas))
    argv = _inferstack(python, "engine", "serve", "--model", settings.model, "--threads", str(threads),
                       *_format_args(settings), *settings.engine_args)
    return ChildSpec(name=_engine_name(None, index), kind="engine", argv=argv, port_args=_port_flag,
                     env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})


def autoscaled_gateway_config(settings: UpSettings, endpoints: list[tuple[str, str]],
                              user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gateway config for an autoscaled stack: the user's config plus pool `default` with the ready
    replicas (name, url) and `scale_from_zero`, so requests wait for a replica instead of a 503. The
    served model's name when known up front (a stack that starts with no replica has nobody to ask)."""
    assert settings.autoscale is not None
    cfg = dict(user_config or {})
    pools = dict(cfg.get("pools") or {})
    model = known_model_name(settings)
    pools["default"] = {"endpoints": [{"url": url, "name": name} for name, url in endpoints],
                        "scale_from_zero": settings.autoscale.hold().model_dump(),
                        **({"models": [model]} if model else {})}
    cfg["pools"] = pools
    return cfg


def known_model_name(settings: UpSettings) -> str | None:
    """The name the replicas will serve, known without starting one: `--served-model-name` among the
    engine arguments, the emulated profile's model, or the model reference named the way the engine names
    it (`engine.weights.location.model_name`: an alias itself, a file's stem, a directory's name). None
    where only the engine can tell: an oci:// reference or a trust policy (the engine serves the pulled or
    verified copy), or a reference that names nothing (the replica's own error says why)."""
    args = list(settings.engine_args)
    for i, a in enumerate(args):
        if a == "--served-model-name" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--served-model-name="):
            return a.split("=", 1)[1]
    if settings.emulate:
        from inferstack.sim.profile import parse_profile

        return parse_profile(settings.emulate).model.name
    if settings.model.startswith("oci://") or any(a.split("=", 1)[0] == "--trust-policy" for a in args):
        return None
    from inferstack.engine.models.shape import ModelLoadError
    from inferstack.engine.weights.location import model_name

    try:
        return model_name(settings.model)
    except ModelLoadError:
        return None


def _engine_name(role: str | None, index: int) -> str:
    return f"{role or 'engine'}-{index}"


def pd_gateway_config(settings: UpSettings, endpoints: list[tuple[str, str, str]],
                      user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gateway config for a PD stack: the user's config (if any) plus pool `default` listing each
    engine (name, url, role). Endpoint names are the child names, so the roles survive the
    supervisor's endpoint updates (the router keys roles by endpoint name)."""
    assert settings.pd is not None
    cfg = dict(user_config or {})
    pools = dict(cfg.get("pools") or {})
    pools["default"] = {
        "endpoints": [{"url": url, "name": name, "role": role} for name, url, role in endpoints],
        "pd": {"enabled": True, "threshold_tokens": settings.pd.threshold_tokens,
               "max_prefill_queue": settings.pd.max_prefill_queue},
    }
    cfg["pools"] = pools
    return cfg


def reuse_gateway_config(ready: list[tuple[str, str, dict[str, Any]]],
                         user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gateway config for `up.kv_reuse`: the user's config plus pool `default` listing each engine (name, url,
    ready-file info) with its KV events and KV transfer address (absent where the engine runs no NIXL: it is
    then never named as a holder), and the precise prefix index in the engines' own KV key space (reported
    in their ready files, so the gateway hashes blocks exactly as they do)."""
    spaces = {json.dumps(info.get("kv_key_space"), sort_keys=True) for _, _, info in ready}
    if len(spaces) != 1 or not ready[0][2].get("kv_key_space") or any("kv_events" not in i for _, _, i in ready):
        raise ValueError("kv_reuse: every engine must report its KV events and the same KV key space in its "
                         f"ready file; got {[info for _, _, info in ready]}")
    cfg = dict(user_config or {})
    pools = dict(cfg.get("pools") or {})
    endpoints = [{"url": url, "name": name, **{k: info[k] for k in ("kv_events", "kv_transfer") if k in info}}
                 for name, url, info in ready]
    space = ready[0][2]["kv_key_space"]
    pools["default"] = {**dict(pools.get("default") or {}), "endpoints": endpoints,
                        "precise_prefix": {**dict((pools.get("default") or {}).get("precise_prefix") or {}),
                                           "model_digest": space["model_digest"], "dtype": space["dtype"],
                                           "kv_layout": space["kv_layout"], "block_size": space["block_size"]}}
    cfg["pools"] = pools
    return cfg


def gateway_spec(settings: UpSettings, backends: list[str], config_file: str | None = None,
                 python: str = sys.executable) -> ChildSpec:
    """The engines form the pool `default`; a config file adds its keys, tenants, routing, other pools."""
    source = [arg for url in backends for arg in ("--backend", url)]
    if config_file:
        source += ["--config", config_file]
    # one worker: the stack replaces the gateway's endpoints through its admin API, which a gateway of
    # several workers does not serve (docs/gateway.md, Workers)
    argv = _inferstack(python, "gateway", "serve", *source, "--host", settings.host, *settings.gateway_args,
                       "--workers", "1")
    return ChildSpec(name="gateway", kind="gateway", argv=argv, port_args=_port_flag)


def redis_spec(binary: str) -> ChildSpec:
    """A private, memory-only Redis for the stack's shared KV tier (nothing written to disk)."""
    argv = (binary, "--bind", "127.0.0.1", "--protected-mode", "yes", "--save", "", "--appendonly", "no")
    return ChildSpec(name="redis", kind="redis", argv=argv, port_args=lambda port: ["--port", str(port)],
                     ready_file_flag=None, probe=redis_ping, url_scheme="redis")


async def redis_ping(port: int) -> bool:
    """PING over RESP: the server is up and answering (what `redis-cli ping` checks)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def prometheus_spec(binary: str, config_file: str, data_dir: str) -> ChildSpec:
    argv = (binary, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
            "--storage.tsdb.retention.time=1d", "--web.enable-lifecycle", "--log.level=warn")
    return ChildSpec(
        name="prometheus", kind="prometheus", argv=argv,
        port_args=lambda port: [f"--web.listen-address=127.0.0.1:{port}"],
        ready_file_flag=None, ready_path="/-/ready", health_path="/-/healthy",
    )
