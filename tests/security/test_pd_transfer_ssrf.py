"""Replayed probe (issue 19, item 2, engine side): a request that names its own KV transfer peer.

A real decode engine (`inferstack engine serve --role decode`, emulated model) gets a completion
whose `kv_transfer_params` point at a listener the "attacker" controls. Before the fix the engine
connected and sent a request id; now it refuses the unsigned location, computes the prompt itself
and counts the refusal, and the listener sees no connection.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from tests.support.procs import Server, inferstack_env, start_inferstack

from inferstack.telemetry.promtext import parse


def test_client_named_transfer_peer_is_never_contacted(engine: Server) -> None:
    decode = engine
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.setblocking(False)
    model = httpx.get(decode.url + "/v1/models").json()["data"][0]["id"]
    params = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": trap.getsockname()[1],
              "remote_request_id": "probe", "remote_num_blocks": 8, "transfer_sig": "0" * 64}
    r = httpx.post(decode.url + "/v1/completions", timeout=60,
                   json={"model": model, "prompt": "word " * 200, "max_tokens": 2, "kv_transfer_params": params})
    assert r.status_code == 200, r.text
    with pytest.raises(BlockingIOError):
        trap.accept()
    trap.close()
    scrape = parse(httpx.get(decode.url + "/metrics").text, t=0.0)
    assert sum(scrape.select("inferstack_kv_connector_peers_refused_total").values()) == 1


def test_decode_engine_without_peers_or_secret_refuses_to_start() -> None:
    env = inferstack_env()
    env.pop("INFERSTACK_KV_TRANSFER_SECRET", None)
    with pytest.raises(RuntimeError, match="--kv-transfer-peers"):
        start_inferstack(["engine", "serve", "--emulate", "cpu:smollm2-135m", "--role", "decode"], env=env)
