"""Turn `UpSettings` into child specs (pure: no processes, no I/O)."""

from __future__ import annotations

import sys

from inferstack.stack.children import ChildSpec
from inferstack.stack.settings import UpSettings


def _inferstack(python: str, *args: str) -> tuple[str, ...]:
    return (python, "-m", "inferstack", *args)


def _port_flag(port: int) -> list[str]:
    return ["--port", str(port)]


def engine_specs(settings: UpSettings, python: str = sys.executable) -> list[ChildSpec]:
    """N real replicas (cores split between them), or one emulator process serving N endpoints."""
    if settings.emulate:
        argv = _inferstack(python, "engine", "serve", "--emulate", settings.emulate,
                           "--emulate-count", str(settings.replicas), *settings.engine_args)
        return [ChildSpec(name="engine-emulated", kind="engine", argv=argv, port_args=_port_flag)]
    threads = settings.threads_per_engine()
    specs = []
    for i in range(settings.replicas):
        kv_args = settings.kv.engine_args() if settings.kv else []
        argv = _inferstack(python, "engine", "serve", "--model", settings.model,
                           "--threads", str(threads), *kv_args, *settings.engine_args)
        specs.append(ChildSpec(
            name=f"engine-{i}", kind="engine", argv=argv, port_args=_port_flag,
            # torch reads these at import; keep BLAS pools from oversubscribing the split cores.
            env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        ))
    return specs


def gateway_spec(settings: UpSettings, backends: list[str], config_file: str | None = None,
                 python: str = sys.executable) -> ChildSpec:
    """The engines form the pool `default`; a config file adds its keys, tenants, routing, other pools."""
    source = [arg for url in backends for arg in ("--backend", url)]
    if config_file:
        source += ["--config", config_file]
    argv = _inferstack(python, "gateway", "serve", *source, "--host", settings.host, *settings.gateway_args)
    return ChildSpec(name="gateway", kind="gateway", argv=argv, port_args=_port_flag)


def prometheus_spec(binary: str, config_file: str, data_dir: str) -> ChildSpec:
    argv = (binary, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
            "--storage.tsdb.retention.time=1d", "--web.enable-lifecycle", "--log.level=warn")
    return ChildSpec(
        name="prometheus", kind="prometheus", argv=argv,
        port_args=lambda port: [f"--web.listen-address=127.0.0.1:{port}"],
        ready_file_flag=None, ready_path="/-/ready", health_path="/-/healthy",
    )
