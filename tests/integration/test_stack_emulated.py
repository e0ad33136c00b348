"""`inferstack up --emulate h100:llama-3-8b --replicas 8`: an emulated fleet behind the gateway."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.support.procs import inferstack_env


@pytest.mark.slow
def test_emulated_fleet_of_eight_serves_through_the_gateway(tmp_path: Path) -> None:
    ready_file = tmp_path / "ready.json"
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferstack", "up", "--emulate", "h100:llama-3-8b", "--replicas", "8",
         "--port", "0", "--log-dir", str(tmp_path / "run"), "--ready-file", str(ready_file)],
        stdout=log, stderr=subprocess.STDOUT, env=inferstack_env(COLUMNS="200"))
    try:
        deadline = time.monotonic() + 120
        while not ready_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        ready = json.loads(ready_file.read_text())
        gateway = ready["urls"][0]
        model = httpx.get(gateway + "/v1/models", timeout=10).json()["data"][0]["id"]
        banner = (tmp_path / "up.log").read_text()
        assert f'"model": "{model}"' in banner and "… and 4 more endpoints" in banner
        state = json.loads(Path(ready["state_file"]).read_text())
        (engine,) = [c for c in state["children"] if c["kind"] == "engine"]
        assert len(engine["urls"]) == 8
        for i in range(4):
            r = httpx.post(gateway + "/v1/chat/completions", timeout=60, json={
                "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": f"hello {i}"}]})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        rows = httpx.get(ready["dashboard"] + "api/state", timeout=10).json()["endpoints"]
        assert len(rows) == 8 and all(row["state"] == "ready" for row in rows)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
