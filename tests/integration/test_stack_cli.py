"""`inferstack up` refuses to start with a precise message and exit code 2 when something is missing."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.support.procs import inferstack_env


def up(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inferstack", "up", *args], capture_output=True, text=True,
                          env=inferstack_env(COLUMNS="200"), timeout=120)


def test_port_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = up("--port", str(port))
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert f"port {port} on 127.0.0.1 is already in use by pid" in out and "--port 0" in out
    assert "Traceback" not in out


def test_missing_model_file_and_prometheus_binary(tmp_path: Path) -> None:
    r = up("--model", str(tmp_path / "missing.gguf"), "--port", "0")
    assert r.returncode == 2 and "does not exist" in r.stdout + r.stderr
    cfg = tmp_path / "inferstack.yaml"
    cfg.write_text("up:\n  with_prometheus: true\n  prometheus_binary: no-such-prometheus\n")
    r = up("--config", str(cfg), "--port", "0")
    assert r.returncode == 2 and "apt-get install prometheus" in r.stdout + r.stderr


def test_bad_config_reports_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "inferstack.yaml"
    cfg.write_text("up:\n  replicas: 0\n")
    r = up("--config", str(cfg))
    assert r.returncode == 2 and f"{cfg}:2:" in r.stdout + r.stderr and "replicas" in r.stdout + r.stderr
