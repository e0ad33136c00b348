"""Start real servers (ours and third-party) on OS-chosen loopback ports and stop them by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    """A port free right now; only for third-party servers that cannot take port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inferstack_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


@dataclass
class Server:
    proc: subprocess.Popen
    urls: list[str]
    log_path: Path
    ready: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.urls[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_inferstack(args: list[str], timeout: float = 180.0, env: dict[str, str] | None = None) -> Server:
    """Run `inferstack ARGS --port 0 --ready-file F` and wait until it reports its URLs."""
    tmp = Path(tempfile.mkdtemp(prefix="inferstack-test-"))
    ready_file = tmp / "ready.json"
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", "inferstack", *args, "--ready-file", str(ready_file)]
    if "--port" not in args:
        cmd += ["--port", "0"]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or inferstack_env())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if ready_file.exists() and ready_file.stat().st_size:
            try:
                ready = json.loads(ready_file.read_text().splitlines()[0])
            except (json.JSONDecodeError, IndexError):
                time.sleep(0.05)
                continue
            return Server(proc=proc, urls=ready["urls"], log_path=log_path, ready=ready)
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"{' '.join(args)} not ready in {timeout}s:\n{log_path.read_text()[-4000:]}")
