"""`inferstack engine serve` as a process: failures are one clear line and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
import sys

from support.procs import inferstack_env


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferstack", "engine", "serve", *args], env=inferstack_env(),
                          capture_output=True, text=True, timeout=120)


def test_missing_model_exits_1_naming_it(tmp_path) -> None:
    ready = tmp_path / "ready.json"
    res = serve("--model", str(tmp_path / "nope.gguf"), "--port", "0", "--ready-file", str(ready))
    assert res.returncode == 1
    assert "could not load the model" in res.stderr and "nope.gguf" in res.stderr
    assert "Traceback" not in res.stderr and not ready.exists()


def test_port_in_use_exits_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = serve("--model", "smollm2-135m", "--port", str(s.getsockname()[1]))
    assert res.returncode == 1 and "cannot listen on 127.0.0.1" in res.stderr
