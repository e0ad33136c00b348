"""`inferstack engine inference-sim`: llm-d-inference-sim's command line over the emulated engine — the
flags map onto the engine, fixed latencies time its steps, and flags it cannot honour are refused."""

from __future__ import annotations

import itertools
import json
import statistics
import time

import httpx
import pytest
from typer.testing import CliRunner

from inferstack.cli.inference_sim import FlagError, InferenceSimFlags, engine_settings
from inferstack.cli.main import app
from inferstack.engine.executor.fixed_latency import FixedLatency
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.scheduler import ScheduledSeq, SchedulerOutput
from support.procs import start_inferstack

# what a GIE/llm-d recipe passes to llm-d-inference-sim
RECIPE = ["--model", "food-review", "--port", "0", "--time-to-first-token", "200", "--inter-token-latency", "20",
          "--max-num-seqs", "5", "--enable-kvcache", "--kv-cache-size", "512", "--block-size", "16",
          "--mode", "random", "--seed", "42"]


def test_flags_map_onto_the_emulated_engine():
    config, timer, count = engine_settings(InferenceSimFlags(
        model="food-review", max_num_seqs=7, max_model_len=2048, kv_cache_size=300, enable_kvcache=True,
        zmq_endpoint="tcp://127.0.0.1:5557", time_to_first_token=150, inter_token_latency=25,
        time_factor_under_load=2.0, data_parallel_size=3))
    assert (config.served_model_name, config.max_num_seqs, config.max_model_len, config.num_kv_blocks) == \
        ("food-review", 7, 2048, 300)
    assert config.enable_prefix_caching and config.kv_events_endpoint == "tcp://127.0.0.1:5557"
    assert timer == FixedLatency(ttft_s=0.15, itl_s=0.025, load_factor=2.0, max_num_seqs=7) and count == 3
    off, _, _ = engine_settings(InferenceSimFlags(model="m", served_model_name=["alias"], zmq_endpoint="tcp://x:1"))
    assert off.served_model_name == "alias" and not off.enable_prefix_caching and off.kv_events_endpoint is None


@pytest.mark.parametrize(("flags", "named"), [
    ({"mode": "echo"}, "--mode echo"), ({"block_size": 64}, "--block-size 64"),
    ({"failure_injection_rate": 10}, "--failure-injection-rate"), ({"max_loras": 2}, "--max-loras"),
    ({"served_model_name": ["a", "b"]}, "--served-model-name"),
    ({"latency_calculator": "poly"}, "--latency-calculator"),
])
def test_flags_without_a_counterpart_are_refused_by_name(flags, named):
    with pytest.raises(FlagError, match=named):
        engine_settings(InferenceSimFlags(model="m", **flags))


def _seq(prompt: int, start: int, n: int, cached: int = 0) -> ScheduledSeq:
    r = Request("r", list(range(prompt)), SamplingParams(max_tokens=4), arrival_time=0.0)
    r.num_cached_tokens = cached
    return ScheduledSeq(r, start, n, [], start + n >= prompt)


def test_fixed_latencies_time_prefill_chunks_decodes_and_load():
    const = FixedLatency(ttft_s=0.2, itl_s=0.02, max_num_seqs=5, load_factor=3.0)
    assert const.step_time(SchedulerOutput([_seq(100, 0, 100)])) == pytest.approx(0.2)
    # a chunked prompt: its chunks add up to the TTFT; a prefix-cache hit does not shorten a constant TTFT
    chunks = [const.step_time(SchedulerOutput([_seq(300, s, 100, cached=0)])) for s in (0, 100, 200)]
    assert sum(chunks) == pytest.approx(0.2)
    assert const.step_time(SchedulerOutput([_seq(300, 160, 140, cached=160)])) == pytest.approx(0.2)
    assert const.step_time(SchedulerOutput([_seq(10, 12, 1)])) == pytest.approx(0.02)
    full = SchedulerOutput([_seq(10, 12 + i, 1) for i in range(5)])
    assert const.step_time(full) == pytest.approx(0.02 * 3.0)           # x factor at max-num-seqs
    per_token = FixedLatency(prefill_overhead_s=0.01, prefill_per_token_s=0.001, per_token=True, itl_s=0.02)
    assert per_token.step_time(SchedulerOutput([_seq(300, 100, 200, cached=100)])) == pytest.approx(0.21)
    assert per_token.step_time(SchedulerOutput([_seq(300, 200, 100, cached=100)])) == pytest.approx(0.1)


def test_a_recipe_command_line_serves_with_its_latencies():
    server = start_inferstack(["engine", "inference-sim", *RECIPE])
    try:
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["food-review"]
        times: list[float] = []
        t0 = time.perf_counter()
        body = {"model": "food-review", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"] and \
                        json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter() - t0)
        assert len(times) >= 8
        assert times[0] >= 0.2                                  # the step holds the configured TTFT
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert 0.015 <= statistics.median(gaps) <= 0.08         # ~20 ms per token (loose: shared machine)
    finally:
        server.stop()


def test_a_flag_without_a_counterpart_exits_2_naming_it():
    bad = CliRunner().invoke(app, ["engine", "inference-sim", "--model", "m", "--mode", "echo"])
    assert bad.exit_code == 2 and "--mode echo" in bad.output
