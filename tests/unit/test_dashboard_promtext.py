"""Windowed rates and histogram quantiles computed the way Prometheus computes them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from inferstack.telemetry.promtext import (
    bucket_increase,
    counter_increase,
    histogram_quantile,
    parse,
)


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 10 events ≤ 0.1, 10 more in (0.1, 0.5]: the median is the top of the first bucket,
    # p75 is half-way through the second one (Prometheus' linear interpolation).
    buckets = {0.1: 10.0, 0.5: 20.0, math.inf: 20.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.01)  # lowest bucket starts at 0


def test_quantile_in_inf_bucket_returns_highest_finite_bound_and_empty_is_none() -> None:
    assert histogram_quantile(0.99, {0.1: 1.0, 1.0: 1.0, math.inf: 10.0}) == 1.0
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.5, {}) is None


@given(st.lists(st.floats(min_value=0.0005, max_value=9.0), min_size=1, max_size=200),
       st.floats(min_value=0.01, max_value=0.99))
def test_quantile_of_real_histogram_lands_in_the_right_bucket(values: list[float], q: float) -> None:
    bounds = (0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 10.0)
    registry = CollectorRegistry()
    h = Histogram("lat_seconds", "x", buckets=bounds, registry=registry)
    t0 = parse(generate_latest(registry).decode(), 0.0)
    for v in values:
        h.observe(v)
    t1 = parse(generate_latest(registry).decode(), 1.0)
    est = histogram_quantile(q, bucket_increase(t0, t1, "lat_seconds"))
    exact = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
    # The estimate lies in the bucket that holds the exact order statistic.
    upper = next(b for b in bounds if exact <= b)
    lower = max([0.0, *[b for b in bounds if b < upper]])
    assert est is not None and lower - 1e-9 <= est <= upper + 1e-9


def test_counter_increase_by_label_handles_restart_and_new_series() -> None:
    old = parse('req_total{status="200"} 10\nreq_total{status="500"} 4\n', 0.0)
    new = parse('req_total{status="200"} 15\nreq_total{status="500"} 1\nreq_total{status="429"} 2\n', 1.0)
    assert counter_increase(old, new, "req_total", by="status") == {"200": 5.0, "500": 1.0, "429": 2.0}


def test_vllm_names_with_colons_parse_and_created_samples_are_dropped() -> None:
    registry = CollectorRegistry()
    Counter("vllm:prompt_tokens", "x", ["model_name"], registry=registry).labels("m").inc(7)
    scrape = parse(generate_latest(registry).decode(), 0.0)
    assert scrape.select("vllm:prompt_tokens_total") == {(("model_name", "m"),): 7.0}
    assert not any(name.endswith("_created") for name, _ in scrape.samples)


def test_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not Prometheus text"):
        parse("this is { not metrics", 0.0)


label_values = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@given(st.lists(st.tuples(label_values, st.floats(min_value=0, max_value=1e9)), min_size=1, max_size=8))
def test_fast_parser_agrees_with_prometheus_client(series: list[tuple[str, float]]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    c = Counter("vllm:request_success", "x", ["model_name", "finished_reason"], registry=registry)
    h = Histogram("gen_ai_server_time_to_first_token_seconds", "x", ["tenant"], registry=registry)
    for value, amount in series:
        c.labels("m", value).inc(amount)
        h.labels(value).observe(amount / 1e9)
    text = generate_latest(registry).decode()
    reference = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for f in text_string_to_metric_families(text) for s in f.samples
                 if not s.name.endswith("_created")}
    assert dict(parse(text, 0.0).samples) == reference
    wanted = {"vllm:request_success_total", "gen_ai_server_time_to_first_token_seconds_bucket"}
    only = parse(text, 0.0, names=wanted)   # the regex fast path: the same samples as the full parse
    assert dict(only.samples) == {k: v for k, v in reference.items() if k[0] in wanted}
