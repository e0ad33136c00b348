"""Scraped engine metrics (vLLM / inferstack and SGLang names) and request-body helpers."""

from __future__ import annotations

import time

from inferstack.config.schema import GatewayConfig, PoolConfig
from inferstack.gateway.datalayer import Pool, parse_engine_metrics
from inferstack.gateway.requests import engine_priority, prompt_parts, session_key

VLLM = """\
# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
vllm:num_requests_waiting{model_name="m"} 2.0
vllm:num_requests_waiting{model_name="lora"} 1.0
vllm:kv_cache_usage_perc{model_name="m"} 0.42
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,chat",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters="x"} 1.6e9
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 5.0
"""

SGLANG = """\
sglang:num_running_reqs{model_name="m"} 7
sglang:num_queue_reqs{model_name="m"} 4
sglang:token_usage{model_name="m"} 0.9
"""


def test_vllm_names_summed_over_models_and_latest_lora_info():
    m = parse_engine_metrics(VLLM)
    assert (m.running, m.queue, m.kv_usage) == (3.0, 3.0, 0.42)
    assert m.adapters_active == {"sql", "chat"} and not m.adapters_waiting and m.max_lora == 2


def test_sglang_names_and_unknown_text():
    m = parse_engine_metrics(SGLANG)
    assert (m.running, m.queue, m.kv_usage) == (7, 4, 0.9)
    assert parse_engine_metrics("# nothing here\nfoo 1\n") is None
    assert parse_engine_metrics("vllm:num_requests_waiting{model_name=\"m\"} not-a-number\n") is None


def test_prompt_parts_are_defensive():
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
                         "junk", {"role": 5}]}
    text = "".join(prompt_parts("chat", chat))
    assert "be brief" in text and "hi" in text
    assert list(prompt_parts("chat", {"messages": "nope"})) == []
    assert list(prompt_parts("completions", {"prompt": "once"})) == ["once"]
    assert list(prompt_parts("completions", {"prompt": [1, 2, 3]})) == ["1,2,3"]
    assert list(prompt_parts("completions", {"prompt": [[4, 5]]})) == ["4,5"]
    assert list(prompt_parts("completions", {"prompt": None})) == []


def test_session_and_priority_mapping():
    assert session_key({"user": "u1"}, None) == "u1"
    assert session_key({"user": "u1"}, b"s9") == "s9"
    assert session_key({}, None) is None
    assert engine_priority(10) == -10 and engine_priority(-1) == 1


def test_a_scrape_round_reads_every_endpoint_on_kept_connections_and_one_failure_costs_only_its_own():
    """`DataLayer._scrape_round`: the first round connects (one connection per endpoint), later rounds write on
    the kept ones and read the answers in one coroutine (no task per endpoint); an endpoint without metrics (404)
    is marked so, and one that drops its connection keeps its last metrics while the others are refreshed."""
    import asyncio

    from inferstack.gateway.datalayer import DataLayer

    async def main():
        conns, running, drop = [0], [1], set()

        async def handler(reader, writer):
            conns[0] += 1
            port = writer.get_extra_info("sockname")[1]
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if port in drop:
                    writer.close()
                    return
                text = b'vllm:num_requests_running{model_name="m"} %d\n' % running[0]
                status = b"404 Not Found" if port == ports[2] else b"200 OK"
                writer.write(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(text), text))
                await writer.drain()

        servers = [await asyncio.start_server(handler, "127.0.0.1", 0) for _ in range(3)]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        cfg = GatewayConfig()
        pool = Pool.from_config("p", PoolConfig(endpoints=[f"http://127.0.0.1:{p}" for p in ports]), cfg)
        layer = DataLayer([pool], cfg)
        for ep in pool.endpoints:
            layer._open(pool, ep)
        try:
            a, b, c = pool.endpoints
            await layer._scrape_round(pool, time.monotonic())
            assert conns[0] == 3 and a.metrics.running == b.metrics.running == 1 and not c.metrics_supported
            running[0] = 5

            async def no_slow_path(ep, now):
                raise AssertionError(f"{ep.id} scraped on a connection of its own")

            layer._scrape_one, scrape_one = no_slow_path, layer._scrape_one
            await layer._scrape_round(pool, time.monotonic())
            assert conns[0] == 3 and a.metrics.running == b.metrics.running == 5  # the kept connections
            layer._scrape_one = scrape_one
            drop.add(ports[0])
            running[0] = 7
            await layer._scrape_round(pool, time.monotonic())
            assert a.metrics.running == 5 and b.metrics.running == 7
        finally:
            for ep in pool.endpoints:
                await layer._close(ep)
            for s in servers:
                s.close()

    asyncio.run(main())


def test_engine_metrics_parsed_with_an_endpoints_label_cache_read_the_same_and_the_cache_stays_bounded():
    """The label sets of an endpoint's series are parsed once and kept across scrapes (the same answers as a parse
    without the cache); LoRA info series whose labels change every scrape never grow the cache past its bound."""
    from inferstack.gateway import datalayer

    cache: dict = {}
    for i in range(600):
        text = (f'vllm:num_requests_running{{model_name="a"}} {i}\nvllm:num_requests_running{{model_name="b"}} 1\n'
                f'vllm:num_requests_waiting{{model_name="a"}} 2\nvllm:kv_cache_usage_perc{{model_name="a"}} 0.5\n'
                f'vllm:lora_requests_info{{running_lora_adapters="x{i}",waiting_lora_adapters="",max_lora="4"}} '
                f'{i}\n')
        cached, fresh = parse_engine_metrics(text, cache), parse_engine_metrics(text)
        assert cached == fresh and cached.running == i + 1 and cached.adapters_active == frozenset({f"x{i}"})
        assert len(cache) <= datalayer._LABELS_KEPT + 1
    assert parse_engine_metrics("<html>oops</html>", cache) is None
