"""One supervised child process: spawn (dies with its parent), wait until ready, stop by PID.

Hygiene: every child runs in its own session (a terminal's Ctrl-C reaches only the supervisor, which
stops children in order) and has PR_SET_PDEATHSIG=SIGTERM, so even a SIGKILLed supervisor leaves no
orphan: the kernel signals each child when the thread that forked it dies. Children must therefore be
spawned from the supervisor's main (event loop) thread, never from a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

PR_SET_PDEATHSIG = 1
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+\s+[A-Z]+\s+(\S+:\s+)?")
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class ChildState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class ChildFailed(RuntimeError):
    """A child exited or timed out before it was ready; the message carries its log tail."""


@dataclass(frozen=True)
class ChildSpec:
    """How to run one child. `argv` excludes the port: `port_args(port)` supplies it per start.

    Readiness: inferstack servers write `--ready-file`; third-party servers (Prometheus) are polled at
    `ready_path` on the URL their port gives.
    """

    name: str
    kind: str                                    # "engine", "gateway", "prometheus"
    argv: tuple[str, ...]
    port_args: Callable[[int], list[str]]
    ready_file_flag: str | None = "--ready-file"
    ready_path: str | None = None               # for servers without a ready file
    health_path: str = "/health"
    # For servers that speak neither (Redis): an async check of the port, for readiness and health.
    probe: Callable[[int], Awaitable[bool]] | None = None
    url_scheme: str = "http"
    env: dict[str, str] = field(default_factory=dict)
    role: str | None = None                     # engines of a PD pool: "prefill" or "decode"


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would ever signal us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Child:
    """A running (or restartable) child with its URLs, log file and restart count."""

    def __init__(self, spec: ChildSpec, log_dir: Path, env: dict[str, str]) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.name}.log"
        self.ready_file = log_dir / f"{spec.name}.ready.json"
        self._env = {**env, **spec.env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.urls: list[str] = []
        self.ready_info: dict[str, Any] = {}     # the ready file's other keys (an engine's kv_transfer, ...)
        self.port = 0
        self.state = ChildState.STARTING
        self.restarts = 0
        self.failures = 0               # consecutive crashes, drives the backoff
        self.health_misses = 0
        self.ready_since: float | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, port: int) -> None:
        """Start the process on `port` (0: any). Returns at once; see `wait_ready`."""
        self.port = port
        self.urls = []
        self.ready_file.unlink(missing_ok=True)
        argv = [*self.spec.argv, *self.spec.port_args(port)]
        if self.spec.ready_file_flag:
            argv += [self.spec.ready_file_flag, str(self.ready_file)]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        self.started_at = time.monotonic()
        self.state = ChildState.STARTING if self.restarts == 0 else ChildState.RESTARTING
        self.health_misses = 0

    async def wait_ready(self, timeout_s: float, client: httpx.AsyncClient) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ChildFailed(f"{self.spec.name} exited with code {code} while starting.\n"
                                  f"Last lines of {self.log_path}:\n{self.log_tail()}")
            urls = await self._probe_ready(client)
            if urls:
                self.urls = urls
                self.state = ChildState.READY
                self.ready_since = time.monotonic()
                return urls
            await asyncio.sleep(0.1)
        raise ChildFailed(f"{self.spec.name} was not ready after {timeout_s:.0f}s.\n"
                          f"Last lines of {self.log_path}:\n{self.log_tail()}")

    async def _probe_ready(self, client: httpx.AsyncClient) -> list[str]:
        if self.spec.ready_file_flag:
            try:
                ready = json.loads(self.ready_file.read_text().splitlines()[0])
                self.ready_info = {k: v for k, v in ready.items() if k != "urls"}
                return list(ready["urls"])
            except (FileNotFoundError, IndexError, json.JSONDecodeError, KeyError):
                return []
        url = f"{self.spec.url_scheme}://127.0.0.1:{self.port}"
        if self.spec.probe is not None:
            return [url] if await self.spec.probe(self.port) else []
        try:
            r = await client.get(url + (self.spec.ready_path or "/"), timeout=1.0)
        except httpx.HTTPError:
            return []
        return [url] if r.status_code == 200 else []

    async def healthy(self, client: httpx.AsyncClient, timeout_s: float = 5.0) -> bool:
        if not self.alive() or not self.urls:
            return False
        if self.spec.probe is not None:
            return await self.spec.probe(self.port)
        try:
            r = await client.get(self.urls[0] + self.spec.health_path, timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def signal(self, sig: int) -> None:
        if self.alive() and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.alive()

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM, bounded wait, then SIGKILL; always reaps the process."""
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        if not await self.wait_exit(timeout_s):
            self.signal(signal.SIGKILL)
            await self.wait_exit(5.0)
        self.state = ChildState.STOPPED

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])

    def last_log_line(self) -> str:
        """The newest log message without its timestamp/level prefix, for one-line progress."""
        tail = self.log_tail(1).strip()
        if tail.startswith("===") or tail == "(no log)":
            return ""
        return _LOG_PREFIX.sub("", tail)[:100]
