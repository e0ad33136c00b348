"""A client that closes a stream once it has `data: [DONE]` (the OpenAI SDK does, before the stream's
terminator arrives) got its whole answer: the gateway counts it as served (200, TTFT observed), not as a
client that went away (499, nothing observed)."""

from __future__ import annotations

import re
import time

import httpx

from inferstack.gateway.auth import hash_key
from support.gateway_procs import start_fake_engine, start_gateway

KEY = "sk-stream-done-0123456789"


def _served(metrics: str) -> bool:
    ttft = re.search(r'gen_ai_server_time_to_first_token_seconds_count\{[^}]*tenant="t"[^}]*\} ([0-9.]+)', metrics)
    return ttft is not None and float(ttft.group(1)) >= 1


def test_a_stream_closed_after_done_is_served_not_abandoned():
    engine = start_fake_engine("--model", "m", "--tokens", "3", "--end-delay-ms", "1500")
    gw = start_gateway({"pools": {"p": {"endpoints": [engine.url]}},
                        "keys": [{"sha256": hash_key(KEY), "tenant": "t"}]})
    try:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    break  # leaving the block closes the connection before the stream's end
        deadline = time.monotonic() + 10
        while not _served(metrics := httpx.get(gw.url + "/metrics").text):
            assert time.monotonic() < deadline, "TTFT of the finished stream never observed"
            time.sleep(0.1)
        assert re.search(r'inferstack_gateway_requests_total\{[^}]*status="200"[^}]*\} 1\.0', metrics)
        assert 'status="499"' not in metrics
    finally:
        gw.stop()
        engine.stop()
