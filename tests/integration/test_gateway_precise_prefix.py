"""Precise prefix routing from KV events published over real ZMQ in the engine's wire format."""

from __future__ import annotations

import time

import httpx

from inferstack.engine.kv.events import BlockStored, ZmqEventPublisher
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.telemetry.promtext import parse
from support.gateway_procs import start_fake_engines, start_gateway

DIGEST = "ab" * 32


def test_kv_events_steer_requests_to_the_engine_holding_the_blocks():
    engines = start_fake_engines(3)
    pubs = [ZmqEventPublisher("tcp://127.0.0.1:0") for _ in engines]
    gw = start_gateway({
        "pools": {"p": {"endpoints": [{"url": e.url, "kv_events": p.endpoint}
                                      for e, p in zip(engines, pubs, strict=True)],
                        "models": ["fake-model"], "routing": "precise",
                        "precise_prefix": {"model_digest": DIGEST, "dtype": "float32"}}},
        "routing": {"profiles": {"precise": {"filters": ["healthy"], "scorers": {"precise-prefix": 3, "in-flight": 1},
                                             "picker": "max-score"}}},
    })
    try:
        prompt = "the shared document " * 20
        # the fake engine's /tokenize returns the prompt's bytes as token ids
        tokens = list(prompt.encode())
        hashes = KVKeySpace(DIGEST, "float32").hashes(tokens, "default")  # salt = tenant "default"
        target = engines[2].url.split("//")[1]

        def served_by() -> str:
            return httpx.post(gw.url + "/v1/completions", json={"model": "fake-model", "prompt": prompt}
                              ).headers["x-gateway-destination-endpoint-served"]

        # ZMQ SUB sockets drop what was published before they connected: republish until the
        # gateway's index has the blocks (a routing decision shows it), within a deadline
        deadline = time.monotonic() + 15
        while True:
            pubs[2].publish([BlockStored(hashes, None, tokens[: len(hashes) * 16], 16)])
            if served_by() == target:
                break
            assert time.monotonic() < deadline, "the gateway never applied the published KV events"
            time.sleep(0.05)
        before = _precise_decisions(gw.url)
        assert {served_by() for _ in range(5)} == {target}
        assert _precise_decisions(gw.url) - before == 5
    finally:
        gw.stop()
        for p in pubs:
            p.close()
        for e in engines:
            e.stop()


def _precise_decisions(url: str) -> float:
    scrape = parse(httpx.get(url + "/metrics").text, t=0.0)
    return sum(scrape.select("inferstack_gateway_routing_decisions_total", pool="p", profile="precise",
                             scorer="precise-prefix").values())
