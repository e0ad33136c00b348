"""`inferstack up --emulate h100:llama-3-8b`: emulated fleets (colocated and xPyD) behind the gateway."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.support.procs import inferstack_env


@contextlib.contextmanager
def emulated_stack(tmp_path: Path, *args: str) -> Iterator[dict]:
    """`inferstack up --emulate h100:llama-3-8b ARGS` until ready; yields the ready file; SIGTERM exits 0."""
    ready_file = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferstack", "up", "--emulate", "h100:llama-3-8b", *args,
         "--port", "0", "--log-dir", str(tmp_path / "run"), "--ready-file", str(ready_file)],
        stdout=(tmp_path / "up.log").open("wb"), stderr=subprocess.STDOUT, env=inferstack_env(COLUMNS="200"))
    try:
        deadline = time.monotonic() + 120
        while not ready_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        yield json.loads(ready_file.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


@pytest.mark.slow
def test_emulated_fleet_of_eight_serves_through_the_gateway(tmp_path: Path) -> None:
    with emulated_stack(tmp_path, "--replicas", "8") as ready:
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


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.slow
def test_emulated_pd_stack_splits_long_prompts_and_moves_their_kv(tmp_path: Path) -> None:
    """`up --emulate h100:llama-3-8b --prefill 1 --decode 2`: the real PD protocol between emulated
    engines (holds, pulls over TCP, hash checks), the decode engine computing under one block."""
    with emulated_stack(tmp_path, "--prefill", "1", "--decode", "2") as ready:
        gateway = ready["urls"][0]
        state = json.loads(Path(ready["state_file"]).read_text())
        engines = {c["name"]: c for c in state["children"] if c["kind"] == "engine"}
        assert {n: (c["role"], len(c["urls"])) for n, c in engines.items()} == {"prefill": ("prefill", 1),
                                                                                "decode": ("decode", 2)}
        model = httpx.get(gateway + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(gateway + "/v1/chat/completions", timeout=60, json={
            "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "lorem ipsum " * 400}]})
        usage = r.json()["usage"]
        assert r.status_code == 200 and usage["completion_tokens"] == 8
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16, "KV came from the peer"
        decode_metrics = "".join(httpx.get(u + "/metrics", timeout=10).text for u in engines["decode"]["urls"])
        assert _metric(decode_metrics, "vllm:external_prefix_cache_hits_total") >= usage["prompt_tokens"] - 16
        assert _metric(decode_metrics, "inferstack_kv_transfer_bytes_total") > 0
        gw = httpx.get(gateway + "/metrics", timeout=10).text
        assert _metric(gw, 'inferstack_gateway_pd_decisions_total{outcome="remote_prefill"') == 1
