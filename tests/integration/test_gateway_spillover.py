"""Spill-over (edge to cloud) through real processes: a gateway, a local engine and a second server
standing in for a hosted OpenAI-compatible provider that requires its own API key.

A pool with no healthy replica (starting, scaled to zero) or saturated (flow control would queue)
sends requests to its fallback, with the fallback's model name and key; a `local_only` tenant never
leaves the local replicas; each spill is counted by pool, fallback and reason."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from inferstack.gateway.auth import hash_key
from support.gateway_procs import start_fake_engine, start_gateway
from support.procs import free_port, metric_sum

PROVIDER_KEY = "sk-provider-test"


@pytest.fixture(scope="module")
def stack():
    local = start_fake_engine("--model", "m", "--ttft-ms", "1500", "--tokens", "2")
    provider = start_fake_engine("--model", "gpt-cloud", "--api-key", PROVIDER_KEY, "--tokens", "2")
    starting = f"http://127.0.0.1:{free_port()}"   # a replica still starting: nothing listens yet
    cfg = {
        "pools": {
            "edge": {"endpoints": [local.url], "models": ["m"], "max_concurrency": 1,
                     "spillover": {"pool": "cloud", "model": "gpt-cloud"}},
            "cold": {"endpoints": [starting], "models": ["m-cold"],
                     "spillover": {"pool": "cloud", "model": "gpt-cloud", "when": ["no_replica"]}},
            "cloud": {"endpoints": [{"url": provider.url, "api_key": PROVIDER_KEY}], "models": ["gpt-cloud"]},
        },
        "keys": [{"sha256": hash_key("key-any"), "tenant": "any"},
                 {"sha256": hash_key("key-private"), "tenant": "private"}],
        "tenants": {"any": {}, "private": {"local_only": True}},
        "gateway": {"flow_control": {"queue_timeout_s": 4}},
    }
    gw = start_gateway(cfg)
    yield gw, local, provider
    for s in (gw, local, provider):
        s.stop()


def _chat(gw, key: str, model: str, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=timeout,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def _served(server) -> list[dict]:
    return httpx.get(f"{server.url}/debug/requests").json()["bodies"]


def _spilled(gw, pool: str, reason: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    return metric_sum(text, "inferstack_gateway_spillover_total", f'fallback="cloud",pool="{pool}",reason="{reason}"')


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def test_no_replica_spills_to_the_provider_with_its_key_and_model(stack):
    gw, _, provider = stack
    anonymous = httpx.post(f"{provider.url}/v1/chat/completions", json={"model": "gpt-cloud", "messages": []})
    assert anonymous.status_code == 401   # the stand-in only serves callers with its key
    before = len(_served(provider))
    r = _chat(gw, "key-any", "m-cold")
    assert r.status_code == 200, r.text
    bodies = _served(provider)
    assert len(bodies) == before + 1 and bodies[-1]["model"] == "gpt-cloud"  # the provider's name, its key
    assert _spilled(gw, "cold", "no_replica") == 1
    # a local_only tenant is never sent out: with no local replica flow control holds it (the
    # provider would have answered in milliseconds)
    with pytest.raises(httpx.ReadTimeout):
        _chat(gw, "key-private", "m-cold", timeout=1.0)
    assert len(_served(provider)) == before + 1 and _spilled(gw, "cold", "no_replica") == 1


def test_saturated_pool_spills_but_local_only_waits_for_a_local_replica(stack):
    gw, local, provider = stack
    local_before, provider_before = len(_served(local)), len(_served(provider))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(_chat, gw, "key-any", "m")           # holds the only local slot for 1.5 s
        _until(lambda: metric_sum(httpx.get(f"{gw.url}/metrics").text, "inferstack_gateway_in_flight",
                                  'pool="edge"') == 1, 10, "the local slot taken")
        t0 = time.monotonic()
        spilled = _chat(gw, "key-any", "m")                      # would queue: served by the provider now
        spill_s = time.monotonic() - t0
        private = pool.submit(_chat, gw, "key-private", "m")     # pinned: queues behind the first
        assert spilled.status_code == 200 and first.result().status_code == 200
        assert private.result().status_code == 200
    # queued, it would wait for the first (~1.5 s) and then take 1.5 s itself
    assert spill_s < 2.0, f"the spilled request waited {spill_s:.2f}s (it should not queue)"
    assert _spilled(gw, "edge", "saturated") == 1
    assert len(_served(provider)) == provider_before + 1 and _served(provider)[-1]["model"] == "gpt-cloud"
    assert len(_served(local)) == local_before + 2                # the first and the local_only one
