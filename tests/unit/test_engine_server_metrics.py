from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from inferstack.engine.stats import EngineStats
from inferstack.telemetry.engine_metrics import ENGINE_METRICS, EngineMetrics
from inferstack.telemetry.metrics_doc import gateway_rows, update_doc

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
DESIGN_NAMES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total", "vllm:request_success_total", "vllm:num_preemptions_total",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
    "vllm:cache_config_info",
    "inferstack:max_num_seqs",  # ours: the running-batch cap the gateway's saturation signal reads
    "inferstack:busy_seconds_total",  # ours: step time, whose rate is the duty cycle an HPA on "GPU util" reads
}


def test_definitions_match_design() -> None:
    assert {m.name for m in ENGINE_METRICS} == DESIGN_NAMES
    assert all(m.name.endswith("_total") for m in ENGINE_METRICS if m.kind == "counter")
    for m in ENGINE_METRICS:
        if m.stat:
            assert hasattr(EngineStats(), m.stat), m.stat


def test_docs_are_generated_from_definitions() -> None:
    text = DOC.read_text()
    assert update_doc(text) == text, "run: PYTHONPATH=src python -m inferstack.telemetry.metrics_doc docs/metrics.md"


def test_gateway_table_lists_design_names() -> None:
    names = {row.split("`")[1] for row in gateway_rows()[2:]}
    assert {"gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds",
            "gen_ai_server_request_duration_seconds", "inferstack_gateway_inter_token_latency_seconds",
            "inferstack_gateway_requests_total", "inferstack_gateway_tokens_total",
            "inferstack_gateway_queue_depth", "inferstack_gateway_queue_wait_seconds",
            "inferstack_gateway_shed_total", "inferstack_gateway_retries_total",
            "inferstack_gateway_routing_decisions_total"} <= names


def test_exposition_parses_and_reads_stats_at_scrape_time() -> None:
    stats = EngineStats(num_running=2, num_waiting=1, kv_cache_usage=0.25, num_kv_blocks=10, prompt_tokens=7,
                        request_success={"stop": 3}, busy_seconds=1.5)
    metrics = EngineMetrics()
    assert b"vllm:num_requests_running{" not in metrics.render()[0]      # nothing until an engine is bound
    metrics.bind("m", lambda: stats)
    obs = metrics.observer()
    obs.on_output(0, 1, {"arrival": 0.0, "scheduled": 0.5, "first_token": 1.0, "now": 1.0}, None)
    obs.on_output(0, 2, {"arrival": 0.0, "scheduled": 0.5, "first_token": 1.0, "now": 1.2}, None)
    obs.on_output(0, 1, {"arrival": 0.0, "scheduled": 0.5, "first_token": 1.0, "now": 1.3, "finished": 1.3}, "stop")
    stats.num_running = 5
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(metrics.render()[0].decode()) for s in fam.samples}
    lab = (("model_name", "m"),)
    assert samples[("vllm:num_requests_running", lab)] == 5
    assert samples[("vllm:kv_cache_usage_perc", lab)] == 0.25
    assert samples[("vllm:prompt_tokens_total", lab)] == 7
    assert samples[("inferstack:busy_seconds_total", lab)] == 1.5
    assert samples[("vllm:request_success_total", (("finished_reason", "stop"), ("model_name", "m")))] == 3
    assert samples[("vllm:time_to_first_token_seconds_sum", lab)] == 1.0
    assert samples[("vllm:request_queue_time_seconds_sum", lab)] == 0.5
    assert samples[("vllm:inter_token_latency_seconds_count", lab)] == 3
    assert abs(samples[("vllm:inter_token_latency_seconds_sum", lab)] - 0.3) < 1e-9
    assert abs(samples[("vllm:request_decode_time_seconds_sum", lab)] - 0.3) < 1e-9


def test_aborted_requests_do_not_skew_latency() -> None:
    metrics = EngineMetrics()
    metrics.bind("m", EngineStats)
    metrics.observer().on_output(0, 0, {"arrival": 0.0, "now": 9.0, "finished": 9.0}, "abort")
    assert b'vllm:e2e_request_latency_seconds_count{model_name="m"} 0.0' in metrics.render()[0]


def test_an_unchanged_engine_is_not_rendered_again_and_every_change_shows() -> None:
    """The render cache: the same text object while stats and histograms are unchanged; a new text as soon
    as either moves (a counter, a gauge, or a request's latency observation)."""
    stats = EngineStats(num_running=1, request_success={"stop": 2})
    m = EngineMetrics()
    m.bind("tiny", lambda: EngineStats(**{**stats.__dict__, "request_success": dict(stats.request_success)}))
    first, _ = m.render()
    assert m.render()[0] is first    # idle: served from the cache

    stats.num_running = 0            # a gauge moved
    second, _ = m.render()
    assert second is not first and b'vllm:num_requests_running{model_name="tiny"} 0.0' in second

    stats.request_success["stop"] = 3   # a counter moved
    third, _ = m.render()
    assert b'vllm:request_success_total{finished_reason="stop",model_name="tiny"} 3.0' in third

    obs = m.observer()               # a finished request observes its latencies; the stats are unchanged
    obs.on_output(0, 1, {"arrival": 0.0, "scheduled": 0.1, "first_token": 0.5, "finished": 0.5, "now": 0.5},
                  "stop")
    fourth, _ = m.render()
    assert fourth is not third
    assert b'vllm:time_to_first_token_seconds_count{model_name="tiny"} 1.0' in fourth
    assert m.render()[0] is fourth


def test_a_transfer_counted_while_the_engine_is_idle_shows_at_the_next_scrape() -> None:
    """Regression: a holder serves another replica's KV read on a transfer thread while its engine stats stay
    equal; the render cache served the text from before the send (test_kv_reuse.py saw 0 bytes sent)."""
    from types import SimpleNamespace

    from inferstack.engine.connector.stats import TransferCollector
    from inferstack.engine.connector.transfer import TransferStats

    sent = TransferStats(path="reuse")
    m = EngineMetrics()
    m.bind("tiny", EngineStats)
    m.add_live(TransferCollector(SimpleNamespace(transfer_stats=lambda: [sent]), "tiny"))
    assert b"inferstack_kv_transfer_bytes_total{" not in m.render()[0]
    assert m.render()[0] == m.render()[0]          # idle: served from the caches
    sent.record("send", "nixl", 14_008_320, 0.01)
    line = b'inferstack_kv_transfer_bytes_total{direction="send",model_name="tiny",path="reuse",transport="nixl"}'
    assert line + b" 1.400832e+07" in m.render()[0]
    sent.record("send", "nixl", 14_008_320, 0.01)
    assert line + b" 2.801664e+07" in m.render()[0]
    sent.fail("send")
    assert b'inferstack_kv_transfer_failures_total{direction="send",model_name="tiny",path="reuse"} 1.0' \
        in m.render()[0]
    assert b"vllm:num_requests_running{" in m.render()[0]


def test_a_live_collector_without_a_version_is_rendered_at_every_scrape() -> None:
    from prometheus_client.core import CounterMetricFamily

    class Moving:
        n = 0.0

        def collect(self):
            fam = CounterMetricFamily("moving", "A counter that changes on another thread.")
            fam.add_metric([], self.n)
            yield fam

    moving = Moving()
    m = EngineMetrics()
    m.bind("tiny", EngineStats)
    m.add_live(moving)
    assert b"moving_total 0.0" in m.render()[0]
    moving.n = 2.0
    assert b"moving_total 2.0" in m.render()[0]
