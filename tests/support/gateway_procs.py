"""Start fake engines and gateways for the gateway tests (real processes, port 0, stopped by PID)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from support.procs import Server, inferstack_env, start_inferstack

FAKE = Path(__file__).with_name("gateway_fake_engine.py")


def start_fake_engine(*args: str, timeout: float = 30.0) -> Server:
    (engine,) = start_fake_engines(1, *args, timeout=timeout)
    return engine


def start_fake_engines(count: int, *args: str, timeout: float = 30.0) -> list[Server]:
    """``count`` fake engines with the same ``args``, started at once (their starts overlap)."""
    return start_fake_engine_set([args] * count, timeout=timeout)


def start_fake_engine_set(argsets: list[tuple[str, ...]], timeout: float = 30.0) -> list[Server]:
    """One fake engine per entry of ``argsets`` (its arguments), all started at once."""
    started = []
    for args in argsets:
        tmp = Path(tempfile.mkdtemp(prefix="gw-fake-"))
        log_path = tmp / "log"
        proc = subprocess.Popen([sys.executable, str(FAKE), "--ready-file", str(tmp / "ready.json"), *args],
                                stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=inferstack_env())
        started.append((proc, tmp / "ready.json", log_path))
    deadline = time.monotonic() + timeout
    servers = []
    for proc, ready, log_path in started:
        while not (ready.exists() and ready.stat().st_size):
            if proc.poll() is not None:
                raise RuntimeError(f"fake engine exited: {log_path.read_text()}")
            if time.monotonic() > deadline:
                for p, _, _ in started:
                    p.kill()
                raise TimeoutError("fake engine not ready")
            time.sleep(0.02)
        info = json.loads(ready.read_text().splitlines()[0])
        servers.append(Server(proc=proc, urls=info["urls"], log_path=log_path, ready=info))
    return servers


def start_gateway(config: dict, *extra: str, env: dict[str, str] | None = None,
                  preexec_fn: Callable[[], None] | None = None) -> Server:
    """``env``: extra environment variables for the gateway (e.g. its admin token)."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-cfg-"))
    path = tmp / "inferstack.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_inferstack(["gateway", "serve", "--config", str(path), *extra], timeout=60,
                            env=inferstack_env(**(env or {})), preexec_fn=preexec_fn)
