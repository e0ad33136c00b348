"""`inferstack up --emulate h100:llama-3-8b`: emulated fleets (colocated and xPyD) behind the gateway."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from tests.support.procs import Server, inferstack_env, metric_sum, start_inferstack, stop_up


def emulated_stack(tmp_path: Path, *args: str) -> Server:
    """`inferstack up --emulate h100:llama-3-8b ARGS`, ready."""
    return start_inferstack(["up", "--emulate", "h100:llama-3-8b", *args, "--log-dir", str(tmp_path / "run")],
                            timeout=120, env=inferstack_env(COLUMNS="200"))


@pytest.mark.slow
def test_emulated_fleet_of_eight_serves_through_the_gateway(tmp_path: Path) -> None:
    stack = emulated_stack(tmp_path, "--replicas", "8")
    try:
        ready = stack.ready
        gateway = stack.url
        model = httpx.get(gateway + "/v1/models", timeout=10).json()["data"][0]["id"]
        banner = stack.log()
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
        stop_up(stack)


@pytest.mark.slow
def test_emulated_pd_stack_splits_long_prompts_and_moves_their_kv(tmp_path: Path) -> None:
    """`up --emulate h100:llama-3-8b --prefill 1 --decode 2`: the real PD protocol between emulated
    engines (holds, pulls over TCP, hash checks), the decode engine computing under one block."""
    stack = emulated_stack(tmp_path, "--prefill", "1", "--decode", "2")
    try:
        ready = stack.ready
        gateway = stack.url
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
        assert metric_sum(decode_metrics, "vllm:external_prefix_cache_hits_total") >= usage["prompt_tokens"] - 16
        # counted in Llama-3-8B's KV bytes (128 KiB per token), not the shadow cache's 8 bytes
        moved = metric_sum(decode_metrics, "vllm:external_prefix_cache_hits_total") * 131072
        assert metric_sum(decode_metrics, "inferstack_kv_transfer_bytes_total") >= moved > 0
        gw = httpx.get(gateway + "/metrics", timeout=10).text
        assert metric_sum(gw, "inferstack_gateway_pd_decisions_total", 'outcome="remote_prefill"') == 1
    finally:
        stop_up(stack)
