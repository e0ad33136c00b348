"""`inferstack up --kv-tiers disk,redis`: KV tiering as one flag. The stack starts its own Redis, the
replicas share it and a disk tier in the log directory, a prefix computed by one replica is loaded by
the other, a killed Redis comes back on its port, and SIGTERM stops Redis with the rest."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis
from tests.support.procs import inferstack_env, metric_sum, start_inferstack, stop_up

pytestmark = pytest.mark.slow


def test_one_flag_gives_replicas_a_shared_redis_and_disk_tier(tmp_path: Path) -> None:
    config = tmp_path / "inferstack.yaml"
    # a crash is noticed within 0.5 s and restarted 0.1 s later (defaults 1 s and 1 s: the same path, slower)
    config.write_text("up:\n  threads: 1\n  engine_args: [--dtype, float32, --max-model-len, '1024', "
                      "--kv-cache-bytes, 64MiB]\n  restart: {health_interval_s: 0.5, initial_backoff_s: 0.1}\n")
    run = tmp_path / "run"
    stack = start_inferstack(["up", "--config", str(config), "--replicas", "2", "--kv-tiers", "disk,redis",
                              "--log-dir", str(run)], timeout=300, env=inferstack_env(COLUMNS="200"))
    try:
        state = json.loads(Path(stack.ready["state_file"]).read_text())
        (server,) = [c for c in state["children"] if c["kind"] == "redis"]
        engines = [c for c in state["children"] if c["kind"] == "engine"]
        assert "starting Redis for the shared KV tier" in stack.log()
        store = redis.Redis.from_url(server["urls"][0] + "/0")
        assert store.ping() and store.dbsize() == 0

        # 600 tokens: two full 256-token chunks computed on engine-0 and saved to both tiers
        prompt = " ".join(f"w{i % 97}" for i in range(300))
        body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        first = httpx.post(engines[0]["urls"][0] + "/v1/completions", json=body, timeout=120).json()
        assert first["usage"]["prompt_tokens"] >= 512
        deadline = time.monotonic() + 30
        while store.dbsize() < 2 or len(list((run / "kv-disk").rglob("*.kv"))) < 2:   # write-back is async
            assert time.monotonic() < deadline, "chunks never reached the shared tiers"
            time.sleep(0.1)
        second = httpx.post(engines[1]["urls"][0] + "/v1/completions", json=body, timeout=120).json()
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512, "engine-1 loaded engine-0's KV"
        metrics = httpx.get(engines[1]["urls"][0] + "/metrics", timeout=10).text
        assert metric_sum(metrics, "vllm:external_prefix_cache_hits_total") >= 512

        # a crashed Redis comes back on the same port (the engines know that URL), empty
        os.kill(server["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            state = json.loads(Path(stack.ready["state_file"]).read_text())
            (again,) = [c for c in state["children"] if c["kind"] == "redis"]
            if again["state"] == "ready" and again["pid"] != server["pid"]:
                break
            assert time.monotonic() < deadline, stack.log()[-3000:]
            time.sleep(0.2)
        assert again["urls"] == server["urls"] and store.dbsize() == 0
        body["prompt"] = " ".join(f"v{i % 89}" for i in range(300))
        assert httpx.post(engines[0]["urls"][0] + "/v1/completions", json=body, timeout=120).status_code == 200
        deadline = time.monotonic() + 30
        while store.dbsize() < 2:
            assert time.monotonic() < deadline, "the engines stopped writing to the restarted Redis"
            time.sleep(0.1)
    finally:
        stop_up(stack)      # Redis included: it is one of the children
