"""Two `inferstack engine serve` processes share a disk tier: the second serves a prefix the first computed."""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from inferstack.engine.connector.nixl_agent import nixl_missing
from support.procs import Server, start_inferstack

pytestmark = pytest.mark.slow

TEXT = " ".join(f"Entry {i}: the indexer stored page {i} of volume {i % 5} in the archive." for i in range(40))


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def complete(url: str, max_tokens: int = 5, **extra) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": "smollm2-135m", "prompt": TEXT, "max_tokens": max_tokens,
                                                  "temperature": 0, **extra}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def test_second_server_reuses_the_first_servers_prefix_from_disk(tmp_path):
    args = ["engine", "serve", "--model", "smollm2-135m", "--dtype", "float32", "--threads", "1",
            "--kv-tiers", "host,disk", "--kv-disk-path", str(tmp_path / "kv"), "--kv-host-bytes", "256MiB"]
    first = start_inferstack(args)
    try:
        reference = complete(first.url)["choices"][0]["text"]
        metrics = httpx.get(f"{first.url}/metrics").text
        assert metric(metrics, "vllm:external_prefix_cache_hits_total") == 0
        assert metric(metrics, "vllm:external_prefix_cache_queries_total") > 512
    finally:
        first.stop()                    # SIGTERM drains: the write-back finishes its disk writes
    second = start_inferstack(args)
    try:
        assert complete(second.url)["choices"][0]["text"] == reference
        metrics = httpx.get(f"{second.url}/metrics").text
        hits = metric(metrics, "vllm:external_prefix_cache_hits_total")
        queries = metric(metrics, "vllm:external_prefix_cache_queries_total")
        assert hits >= 512 and queries - hits <= 256, "all full chunks of the prompt came from disk"
        assert 'inferstack_kv_tier_hits_total{model_name="smollm2-135m",tier="disk"}' in metrics
        assert metric(metrics, "inferstack_kv_connector_loaded_tokens_total") == hits
    finally:
        second.stop()


def test_prefill_and_decode_servers_over_http():
    """The gateway's PD flow by hand: prefill leg (max_tokens 1), then the decode leg with its params."""
    base = ["engine", "serve", "--model", "smollm2-135m", "--dtype", "float32", "--threads", "1"]
    # the decode engine loads its model while the prefill engine computes (one core each)
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(start_inferstack, [*base, "--role", "decode", "--kv-transfer-peers", "127.0.0.1"])
        try:
            _prefill_then_decode(start_inferstack([*base, "--role", "prefill"]), starting)
        finally:
            starting.result().stop()


def _prefill_then_decode(prefill: Server, starting: Future[Server]) -> None:
    try:
        reference = complete(prefill.url)["choices"][0]["text"]          # colocated on the prefill engine
        leg1 = complete(prefill.url, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        params = leg1["kv_transfer_params"]
        assert params["do_remote_prefill"] and params["remote_port"] > 0 and params["remote_num_blocks"] >= 32
        decode = starting.result()
        leg2 = complete(decode.url, kv_transfer_params=params)
        assert leg2["choices"][0]["text"] == reference
        assert "kv_transfer_params" not in leg2
        metrics = httpx.get(f"{decode.url}/metrics").text
        hits = metric(metrics, "vllm:external_prefix_cache_hits_total")
        queries = metric(metrics, "vllm:external_prefix_cache_queries_total")
        assert hits > 0 and queries - hits <= 16, "the decode engine computed at most one block of the prompt"
        assert metric(metrics, "inferstack_kv_transfer_bytes_total") > 0
        # the default transport (auto) is NIXL where it imports; the old one otherwise
        transport = "shm" if nixl_missing() is not None else "nixl"
        assert re.search(rf'^inferstack_kv_transfers_total{{[^}}]*transport="{transport}"[^}}]*}} 1.0$', metrics, re.M)
    finally:
        prefill.stop()
