"""The gateway in front of the real engine (`inferstack engine serve --model smollm2-135m`), driven by
the official `openai` client; the engine's KV events feed the gateway's precise prefix index."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from inferstack.engine.kv.hashing import model_digest
from inferstack.gateway.auth import hash_key
from support.gateway_procs import start_fake_engine, start_gateway
from support.procs import free_port, start_inferstack

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
KEY = "sk-real-engine"


@pytest.fixture(scope="module")
def stack(smollm2_gguf):
    events = f"tcp://127.0.0.1:{free_port()}"
    engine = start_inferstack(["engine", "serve", "--model", MODEL, "--threads", "1", "--dtype", "float32",
                               "--max-model-len", "1024", "--kv-cache-bytes", "128MiB",
                               "--scheduling-policy", "priority", "--kv-events-endpoint", events])
    decoy = start_fake_engine("--model", MODEL)  # no KV events: only the real engine can hold blocks
    gw = start_gateway({
        "pools": {"solo": {"endpoints": [engine.url]}, "mixed": {
            "endpoints": [{"url": engine.url, "kv_events": events}, decoy.url], "models": [MODEL],
            "routing": "precise",
            "precise_prefix": {"model_digest": model_digest([smollm2_gguf]), "dtype": "float32"}}},
        "routing": {"profiles": {"precise": {"filters": ["healthy"], "scorers": {"precise-prefix": 3, "in-flight": 1},
                                             "picker": "max-score"}}},
        # Both pools serve MODEL; name its public route explicitly so a request never depends on which
        # pool finished discovering its endpoints' /v1/models first.
        "models": {"smol-precise": {"targets": [{"pool": "mixed", "model": MODEL}]},
                   MODEL: {"targets": [{"pool": "solo"}]}},
        "objectives": {"urgent": {"priority": 5}},
        "keys": [{"sha256": hash_key(KEY), "tenant": "acme", "objective": "urgent"}],
    })
    yield engine, decoy, gw
    gw.stop()
    decoy.stop()
    engine.stop()


def test_openai_client_through_gateway_to_real_engine(stack):
    _, _, gw = stack
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert MODEL in {m.id for m in client.models.list()}
    r = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Say hello."}])
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Say hello."}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # greedy: same answer streamed or not
    assert all(c.usage is None for c in chunks)  # the gateway's usage request was stripped
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert c.choices[0].text
    metrics = httpx.get(gw.url + "/metrics").text
    assert re.search(r'gen_ai_server_time_to_first_token_seconds_count\{.*tenant="acme"\} [1-9]', metrics)
    assert re.search(r'inferstack_gateway_tokens_total\{.*type="output"\} [1-9]', metrics)


def test_kv_events_from_the_real_engine_steer_the_gateway(stack):
    engine, _, gw = stack
    prompt = "Once upon a time in a land far away there lived a curious fox who " * 6
    # warm the real engine directly, with the salt the gateway will set for tenant acme
    r = httpx.post(engine.url + "/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "cache_salt": "acme"})
    assert r.status_code == 200
    target = engine.url.split("//")[1]

    def route() -> str:
        r = httpx.post(gw.url + "/v1/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"model": "smol-precise", "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.headers["x-gateway-destination-endpoint-served"]

    # the BlockStored batch reaches the gateway over ZMQ: poll until a decision shows it (deadline)
    deadline = time.monotonic() + 15
    while route() != target:
        assert time.monotonic() < deadline, "the engine's KV events never steered the gateway"
        time.sleep(0.05)
    served = [route() for _ in range(4)]
    assert set(served) == {engine.url.split("//")[1]}
    metrics = httpx.get(gw.url + "/metrics").text
    assert re.search(r'routing_decisions_total\{pool="mixed",profile="precise",scorer="precise-prefix"\} [1-9]',
                     metrics)
