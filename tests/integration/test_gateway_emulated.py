"""The gateway over a fleet of emulated engines (`engine serve --emulate`, real scheduler, prefix cache
and /metrics): idle spreading, prefix affinity that the engines' own cache counters confirm."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from support.gateway_procs import start_gateway
from support.procs import start_inferstack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


@pytest.fixture(scope="module")
def fleet():
    engines = start_inferstack(["engine", "serve", "--emulate", "h100:llama-3-8b", "--emulate-count", "4"])
    gw = start_gateway({"pools": {"emu": {"endpoints": engines.urls}}})
    yield engines, gw
    gw.stop()
    engines.stop()


def _hits(url: str) -> float:
    m = re.search(r'^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$', httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_idle_fleet_spreads_and_shared_prefixes_hit_the_cache(fleet):
    engines, gw = fleet
    served = []
    for i in range(8):
        r = httpx.post(gw.url + "/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": f"Topic {i}: " + f"fact {i} " * 60, "max_tokens": 4})
        assert r.status_code == 200, r.text
        served.append(r.headers["x-gateway-destination-endpoint-served"])
    assert sorted(served.count(s) for s in set(served)) == [2, 2, 2, 2]

    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    system = "You are the support assistant of a company that sells very long manuals. " * 20
    before = {u: _hits(u) for u in engines.urls}
    holders = set()
    for i in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=4, messages=[{"role": "system", "content": system},
                                                 {"role": "user", "content": f"question {i}"}])
        holders.add(raw.headers["x-gateway-destination-endpoint-served"])
        assert raw.parse().choices[0].message.content
    assert len(holders) == 1
    served_by = holders.pop()
    holder = next(u for u in engines.urls if u.endswith(served_by))
    gained = {u: _hits(u) - before[u] for u in engines.urls}
    assert gained[holder] > 0 and all(v == 0 for u, v in gained.items() if u != holder), gained
