"""Prefill/decode disaggregation end to end: `inferstack engine serve --role prefill` and `--role decode`
behind `inferstack gateway serve` with a PD pool, driven by the official `openai` client."""

from __future__ import annotations

import glob
import os
import signal

import httpx
import openai
import pytest

from support.gateway_procs import start_gateway
from support.procs import metric_sum, start_inferstack

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
ENGINE = ["engine", "serve", "--model", MODEL, "--threads", "1", "--dtype", "float32",
          "--max-model-len", "1024", "--kv-cache-bytes", "64MiB"]


def long_prompt(topic: str) -> list[dict]:
    facts = " ".join(f"Fact {i}: the {topic} archive keeps record {i} on shelf {i % 7}." for i in range(24))
    return [{"role": "user", "content": f"{facts}\nIn one sentence, what does the {topic} archive keep?"}]


@pytest.fixture(scope="module")
def stack():
    prefill = start_inferstack([*ENGINE, "--role", "prefill"])
    decode = gw = None
    try:
        decode = start_inferstack([*ENGINE, "--role", "decode", "--kv-transfer-peers", "127.0.0.1"])
        gw = start_gateway({
            # active health checks rarely, so a killed prefill engine is found by the prefill leg
            "gateway": {"health_interval_s": 300, "max_retries": 0},
            "pools": {
                "pd": {"endpoints": [{"url": prefill.url, "role": "prefill", "name": "p0"},
                                     {"url": decode.url, "role": "decode", "name": "d0"}],
                       "models": [MODEL], "pd": {"threshold_tokens": 64}},
                # colocated reference: the whole request on one engine (the prefill engine, so the
                # decode engine's cache stays cold for the PD requests)
                "colo": {"endpoints": [prefill.url], "models": ["colo"]},
            },
            "models": {"smol-colo": {"targets": [{"pool": "colo", "model": MODEL}]}},
        })
        yield prefill, decode, gw
    finally:
        for s in (gw, decode, prefill):
            if s is not None:
                s.stop()
        for seg in glob.glob(f"/dev/shm/inferstack-kvt-{prefill.proc.pid}-*"):
            os.unlink(seg)  # the killed prefill engine could not delete its segments


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=180)


def test_pd_output_equals_colocated_and_kv_moved(stack):
    _, decode, gw = stack
    c = client(gw)
    msgs = long_prompt("harbour")
    ref = c.chat.completions.create(model="smol-colo", messages=msgs, max_tokens=10, temperature=0)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == ref.choices[0].message.content
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens > 200
    assert r.usage.completion_tokens == ref.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 16, "KV came from the peer"
    dm = httpx.get(decode.url + "/metrics").text
    assert metric_sum(dm, "vllm:external_prefix_cache_hits_total") >= r.usage.prompt_tokens - 16
    assert metric_sum(dm, "inferstack_kv_transfer_bytes_total") > 0
    gm = httpx.get(gw.url + "/metrics").text
    assert metric_sum(gm, "inferstack_gateway_pd_decisions_total", 'outcome="remote_prefill"') == 1
    assert metric_sum(gm, "inferstack_gateway_pd_prefill_seconds_count", 'endpoint="p0"') == 1

    # streamed decode leg, a different prompt: same text as the colocated stream
    msgs = long_prompt("observatory")
    ref_text = c.chat.completions.create(model="smol-colo", messages=msgs, max_tokens=10,
                                        temperature=0).choices[0].message.content
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref_text
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 200 and usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 16
    gm = httpx.get(gw.url + "/metrics").text
    assert metric_sum(gm, "inferstack_gateway_pd_decisions_total", 'outcome="remote_prefill"') == 2


def test_short_prompt_and_cached_prefix_skip_remote_prefill(stack):
    _, decode, gw = stack
    c = client(gw)
    before = httpx.get(decode.url + "/metrics").text
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                  max_tokens=3, temperature=0)
    assert r.choices[0].message.content
    # the harbour prompt now lives on the decode endpoint: the decider keeps it there
    r = c.chat.completions.create(model=MODEL, messages=long_prompt("harbour"), max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 16
    after = httpx.get(decode.url + "/metrics").text
    gm = httpx.get(gw.url + "/metrics").text
    assert metric_sum(gm, "inferstack_gateway_pd_decisions_total", 'outcome="local_cached"') == 2
    assert metric_sum(gm, "inferstack_gateway_pd_decisions_total", 'outcome="remote_prefill"') == 2
    assert (metric_sum(after, "inferstack_kv_transfer_bytes_total")
            == metric_sum(before, "inferstack_kv_transfer_bytes_total"))


def test_dead_prefill_engine_falls_back_to_recompute(stack):
    prefill, _, gw = stack
    c = client(gw)
    msgs = long_prompt("greenhouse")
    ref = c.chat.completions.create(model="smol-colo", messages=msgs, max_tokens=8, temperature=0)
    prefill.proc.send_signal(signal.SIGKILL)
    prefill.proc.wait(10)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == ref.choices[0].message.content
    # only the chat template's shared first block was cached: the decode endpoint recomputed the rest
    assert r.usage.prompt_tokens_details.cached_tokens <= 32 < r.usage.prompt_tokens
    gm = httpx.get(gw.url + "/metrics").text
    assert metric_sum(gm, "inferstack_gateway_pd_fallbacks_total", 'reason="connection"') == 1
