"""`inferstack up --prefill 1 --decode 1`: a real xPyD stack (two CPU engines with PD roles behind the
gateway's PD pool) in a subprocess; a long greedy chat through the gateway equals the colocated answer,
its KV moved from the prefill to the decode engine, and SIGTERM leaves no child behind."""

from __future__ import annotations

import glob
import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from tests.support.procs import inferstack_env, metric_sum, start_inferstack, stop_up

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


def test_xpyd_stack_serves_the_colocated_answer_with_kv_transfer(tmp_path: Path) -> None:
    config = tmp_path / "inferstack.yaml"
    config.write_text(
        "up:\n  threads: 1\n  pd: {threshold_tokens: 16, prefill: 1, decode: 1}\n"
        "  engine_args: [--dtype, float32, --max-model-len, '1024', --kv-cache-bytes, 64MiB]\n"
        # the killed engine is noticed within 0.5 s and restarted 0.1 s later (defaults 1 s and 1 s)
        "  restart: {health_interval_s: 0.5, initial_backoff_s: 0.1}\n")
    stack = start_inferstack(["up", "--config", str(config), "--prefill", "1", "--decode", "1",
                              "--log-dir", str(tmp_path / "run")], timeout=300, env=inferstack_env(COLUMNS="200"))
    try:
        ready = stack.ready
        state = json.loads(Path(ready["state_file"]).read_text())
        engines = {c["name"]: c for c in state["children"] if c["kind"] == "engine"}
        assert {n: c["role"] for n, c in engines.items()} == {"prefill-0": "prefill", "decode-0": "decode"}
        banner = stack.log()
        assert "1 prefill + 1 decode engine(s)" in banner and "prefill-0" in banner and "decode-0" in banner

        def chat(url: str, topic: str) -> openai.types.chat.ChatCompletion:
            facts = " ".join(f"Fact {i}: the {topic} archive keeps record {i} on shelf {i % 7}." for i in range(24))
            msgs = [{"role": "user", "content": f"{facts}\nIn one sentence, what does the {topic} archive keep?"}]
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=180)
            return c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)

        def remote_prefills() -> float:
            gm = httpx.get(stack.url + "/metrics").text
            return metric_sum(gm, "inferstack_gateway_pd_decisions_total", 'outcome="remote_prefill"')

        decode_url, prefill_url = engines["decode-0"]["urls"][0], engines["prefill-0"]["urls"][0]
        ref = chat(prefill_url, "harbour")  # any engine runs a whole request colocated
        r = chat(ready["urls"][0], "harbour")
        assert r.choices[0].message.content == ref.choices[0].message.content
        assert r.usage.prompt_tokens == ref.usage.prompt_tokens > 200
        metrics = httpx.get(decode_url + "/metrics").text
        assert metric_sum(metrics, "inferstack_kv_transfer_bytes_total") > 0
        assert metric_sum(metrics, "vllm:external_prefix_cache_hits_total") >= r.usage.prompt_tokens - 16
        assert remote_prefills() == 1

        # a killed prefill engine comes back with its role, and long prompts are split again
        old_pid = engines["prefill-0"]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            child = next(c for c in json.loads(Path(ready["state_file"]).read_text())["children"]
                         if c["name"] == "prefill-0")
            if child["state"] == "ready" and child["pid"] != old_pid:
                break
            assert time.monotonic() < deadline, stack.log()[-3000:]
            time.sleep(0.2)
        for seg in glob.glob(f"/dev/shm/inferstack-kvt-{old_pid}-*"):
            os.unlink(seg)  # a SIGKILLed engine cannot delete its transfer segments
        argv = Path(f"/proc/{child['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--role") + 1] == b"prefill"
        ref = chat(child["urls"][0], "observatory")
        r = chat(ready["urls"][0], "observatory")
        assert r.choices[0].message.content == ref.choices[0].message.content
        assert remote_prefills() == 2
    finally:
        stop_up(stack)
