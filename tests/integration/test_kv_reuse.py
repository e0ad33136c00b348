"""Cross-replica KV reads end to end: two real engines with `--kv-reuse` behind the gateway's precise
prefix index. Engine A serves a long prompt; the same prompt routed to engine B is READ from A over
NIXL (bytes counted on both sides, B's answer equal to A's); then A is SIGKILLed after caching
another prompt, and B, still told that A holds it, falls back to computing and answers the same."""

from __future__ import annotations

import signal

import httpx
import openai
import pytest

from inferstack.engine.connector.nixl_agent import nixl_missing
from inferstack.engine.kv.hashing import model_digest
from support.gateway_procs import start_gateway
from support.procs import free_port, inferstack_env, metric_sum, start_inferstack

pytestmark = pytest.mark.slow
if nixl_missing() is not None:
    pytest.skip(f"nixl does not import: {nixl_missing()}", allow_module_level=True)

MODEL = "smollm2-135m"
ENGINE = ["engine", "serve", "--model", MODEL, "--threads", "1", "--dtype", "float32",
          "--max-model-len", "1024", "--kv-cache-bytes", "64MiB", "--kv-reuse"]


def long_prompt(topic: str) -> list[dict]:
    facts = " ".join(f"Fact {i}: the {topic} archive keeps record {i} on shelf {i % 7}." for i in range(16))
    return [{"role": "user", "content": f"{facts}\nIn one sentence, what does the {topic} archive keep?"}]


@pytest.fixture(scope="module")
def fleet(smollm2_gguf):
    secret = {"INFERSTACK_KV_TRANSFER_SECRET": "reuse-test-secret"}
    env = inferstack_env(**secret)
    engines, endpoints = [], []
    gw = None
    try:
        for name in ("a", "b"):
            events, transfer = f"tcp://127.0.0.1:{free_port()}", free_port()
            engines.append(start_inferstack([*ENGINE, "--kv-events-endpoint", events,
                                             "--kv-transfer-port", str(transfer)], env=env))
            endpoints.append({"url": engines[-1].url, "name": name, "kv_events": events,
                              "kv_transfer": f"127.0.0.1:{transfer}"})
            # what `inferstack up --kv-reuse` builds the gateway's pool from (stack/plan.py)
            ready = engines[-1].ready
            assert (ready["kv_events"], ready["kv_transfer"]) == (events, f"127.0.0.1:{transfer}")
            assert ready["kv_key_space"] == {"model_digest": model_digest([smollm2_gguf]), "dtype": "float32",
                                             "kv_layout": "paged", "block_size": 16}
        gw = start_gateway({
            # round-robin: requests alternate a, b, a, b; health checks rarely, so a killed engine
            # still looks healthy and is still named as the holder of what it had cached
            "gateway": {"health_interval_s": 300, "max_retries": 0},
            "pools": {"fleet": {"endpoints": endpoints, "models": [MODEL], "routing": "round-robin",
                                "precise_prefix": {"model_digest": model_digest([smollm2_gguf]),
                                                   "dtype": "float32"}}},
        }, env=secret)
        yield engines, gw
    finally:
        for s in (gw, *engines):
            if s is not None:
                s.stop()


def ask(gw, msgs: list[dict]):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=180)
    return c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)


def served(raw) -> tuple[str, object]:
    return raw.headers["x-gateway-destination-endpoint-served"], raw.parse()


def test_replica_reads_prefix_from_holder_then_falls_back_when_holder_died(fleet):
    (a, b), gw = fleet
    msgs = long_prompt("harbour")
    where, ref = served(ask(gw, msgs))
    assert where == "a"
    where, r = served(ask(gw, msgs))
    assert where == "b"
    assert r.choices[0].message.content == ref.choices[0].message.content
    assert r.usage.completion_tokens == ref.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 16 > 150, "KV came from a"
    bm, am = httpx.get(b.url + "/metrics").text, httpx.get(a.url + "/metrics").text
    got = metric_sum(bm, "inferstack_kv_transfer_bytes_total", 'path="reuse"')
    assert got > 0 and got == metric_sum(am, "inferstack_kv_transfer_bytes_total", 'direction="send"')
    assert metric_sum(bm, "inferstack_kv_transfer_bytes_total", 'transport="nixl"') == got
    gm = httpx.get(gw.url + "/metrics").text
    assert metric_sum(gm, "inferstack_gateway_kv_direct_reads_total", 'outcome="direct"') == 1

    msgs = long_prompt("observatory")
    where, ref = served(ask(gw, msgs))
    assert where == "a"
    # a's cached blocks are gone; the gateway still names a (and tokenizes on b after a refuses)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    where, r = served(ask(gw, msgs))
    assert where == "b"
    assert r.choices[0].message.content == ref.choices[0].message.content
    assert r.usage.completion_tokens == ref.usage.completion_tokens
    gm = httpx.get(gw.url + "/metrics").text
    assert metric_sum(gm, "inferstack_gateway_kv_direct_reads_total", 'outcome="direct"') == 2, gm
    bm = httpx.get(b.url + "/metrics").text
    assert metric_sum(bm, "inferstack_kv_transfer_bytes_total", 'path="reuse"') == got, "nothing more was read"
    assert metric_sum(bm, "inferstack_kv_transfer_failures_total", 'path="reuse"') == 1, b.log()[-3000:]
