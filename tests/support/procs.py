"""Start real servers (ours and third-party) on OS-chosen loopback ports and stop them by PID."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def until(check: Callable[[], bool], timeout_s: float = 5.0, every_s: float = 0.05) -> bool:
    """Poll ``check`` until it holds (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every_s)
    return False


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

    def imported(self) -> set[str]:
        """Top-level packages the process imported, from its log when started with PYTHONPROFILEIMPORTTIME=1
        (lines ``import time: self | cumulative | name``)."""
        return {m.group(1).split(".")[0]
                for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+([\w.]+)", self.log(), re.M)}

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_inferstack(args: list[str], timeout: float = 180.0, env: dict[str, str] | None = None,
                     preexec_fn: Callable[[], None] | None = None, module: str = "inferstack") -> Server:
    """Run `inferstack ARGS --port 0 --ready-file F` and wait until it reports its URLs.
    ``preexec_fn`` runs in the child before exec (e.g. to ignore a signal the test provokes);
    ``module``: another entry point with the same CLI (e.g. `support.faulty_picker`)."""
    tmp = Path(tempfile.mkdtemp(prefix="inferstack-test-"))
    ready_file = tmp / "ready.json"
    log_path = tmp / "server.log"
    cmd = [sys.executable, "-m", module, *args, "--ready-file", str(ready_file)]
    if "--port" not in args:
        cmd += ["--port", "0"]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or inferstack_env(),
                            preexec_fn=preexec_fn)
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


def pid_gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent's `wait` counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def metric_sum(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` in Prometheus text whose label set contains ``labels``."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def stop_up(stack: Server, timeout: float = 60.0) -> None:
    """SIGTERM an `inferstack up` started with `start_inferstack`: it must exit 0 and leave none of
    the children listed in its state.json running."""
    state = Path(stack.ready["state_file"])
    pids = [c["pid"] for c in json.loads(state.read_text())["children"] if c["pid"]] if state.exists() else []
    code = stack.stop(timeout)
    assert code == 0, stack.log()[-3000:]
    deadline = time.monotonic() + 10
    while not all(pid_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(pid_gone(p) for p in pids), "SIGTERM left children behind"
