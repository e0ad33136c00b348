"""Bench building blocks: workloads, traces, SLO parsing, arrivals and the metric definitions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.bench.arrivals import arrival_times
from inferstack.bench.client import RequestRecord, parse_stream
from inferstack.bench.distributions import parse_length
from inferstack.bench.metrics import meets, summarize
from inferstack.bench.records import OK
from inferstack.bench.slo import SLOError, parse_slo
from inferstack.bench.traces import TraceError, load_trace
from inferstack.bench.workloads import WorkloadError, parse_workload


def _text(spec) -> str:
    return " ".join(m[1] for m in spec.messages)


def take(spec: str, n: int, seed: int = 0):
    it = parse_workload(spec).units(seed)
    return [next(it) for _ in range(n)]


def test_synthetic_lengths_and_determinism() -> None:
    units = take("synthetic:input=uniform(10,20),output=7", 50)
    for u in units:
        (req,) = u.stages[0]
        assert 10 <= req.input_tokens <= 20 and req.output_tokens == 7
        assert len(_text(req).split()) == req.input_tokens
    again = take("synthetic:input=uniform(10,20),output=7", 50)
    assert [_text(u.stages[0][0]) for u in units] == [_text(u.stages[0][0]) for u in again]
    other = take("synthetic:input=uniform(10,20),output=7", 50, seed=1)
    assert [_text(u.stages[0][0]) for u in units] != [_text(u.stages[0][0]) for u in other]


def test_shared_prefix_groups_share_exactly_the_system_prompt() -> None:
    units = take("shared-prefix:groups=3,users=2,system=40,question=10,output=5", 12)
    by_group: dict[str, set[str]] = {}
    for u in units:
        req = u.stages[0][0]
        assert req.messages[0][0] == "system" and len(req.messages[0][1].split()) == 40
        by_group.setdefault(req.group or "", set()).add(req.messages[0][1])
    assert len(by_group) == 3 and all(len(v) == 1 for v in by_group.values())
    assert len({next(iter(v)) for v in by_group.values()}) == 3


def test_shared_prefix_zipf_popularity_follows_the_law() -> None:
    units = take("shared-prefix:groups=8,users=4,system=5,question=3,output=2,popularity=zipf(1.1)", 4000)
    counts = np.bincount([int((u.stages[0][0].group or "g0")[1:]) for u in units], minlength=8)
    expected = 1 / np.arange(1, 9) ** 1.1
    assert np.allclose(counts / counts.sum(), expected / expected.sum(), atol=0.02)
    again = take("shared-prefix:groups=8,users=4,system=5,question=3,output=2,popularity=zipf(1.1)", 50)
    assert [_text(u.stages[0][0]) for u in units[:50]] == [_text(u.stages[0][0]) for u in again]


def test_multi_turn_history_grows_and_prefixes_repeat() -> None:
    (unit,) = take("multi-turn:turns=4,input=5,output=3", 1)
    reqs = [stage[0] for stage in unit.stages]
    assert [r.input_tokens for r in reqs] == [5, 13, 21, 29]
    for prev, cur in itertools.pairwise(reqs):
        assert cur.messages[: len(prev.messages)] == prev.messages
        assert cur.messages[len(prev.messages)][0] == "assistant"


def test_agentic_fanout_shares_context() -> None:
    (unit,) = take("agentic:fanout=3,context=20,input=4,output=2", 1)
    assert [len(s) for s in unit.stages] == [1, 3, 1]
    ctx = unit.stages[0][0].messages[0]
    assert all(r.messages[0] == ctx for stage in unit.stages for r in stage)
    plan = unit.stages[1][0].messages[:3]
    assert all(r.messages[:3] == plan for r in unit.stages[1])


@pytest.mark.parametrize("spec,match", [
    ("nosuch", "unknown workload"),
    ("synthetic:input=abc", "input="),
    ("synthetic:input=uniform(5)", "takes 2"),
    ("synthetic:input=uniform(9,3)", "a <= b"),
    ("synthetic:colour=red", "unknown parameter"),
    ("shared-prefix:groups=0", "groups must be >= 1"),
    ("shared-prefix:popularity=zipf(0)", "popularity must be uniform or zipf"),
    ("shared-prefix:popularity=pareto", "popularity must be uniform or zipf"),
    ("trace", "needs path"),
    ("trace:path=/no/such/file.jsonl", "does not exist"),
])
def test_bad_workload_specs(spec: str, match: str) -> None:
    with pytest.raises(WorkloadError, match=match):
        parse_workload(spec)


def test_length_distributions() -> None:
    rng = np.random.default_rng(0)
    assert parse_length("normal(500,50)", "x").sample(rng, 4000).mean() == pytest.approx(500, rel=0.02)
    assert np.median(parse_length("lognormal(300,0.5)", "x").sample(rng, 4000)) == pytest.approx(300, rel=0.05)
    assert parse_length("exponential(100)", "x").sample(rng, 4000).min() >= 1


def test_azure_trace(tmp_path) -> None:
    p = tmp_path / "azure.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    rows = load_trace(p)
    assert [(r.input_tokens, r.output_tokens) for r in rows] == [(374, 44), (396, 109)]
    assert rows[1].timestamp - rows[0].timestamp == pytest.approx(4.314579, abs=1e-5)
    units = list(parse_workload(str(p)).units(0))
    assert [u.at for u in units] == pytest.approx([0.0, 4.314579], abs=1e-5)


def test_mooncake_trace_shares_blocks(tmp_path) -> None:
    p = tmp_path / "mooncake.jsonl"
    recs = [{"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [1, 2, 3]},
            {"timestamp": 1500, "input_length": 700, "output_length": 5, "hash_ids": [1, 9]}]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    units = list(parse_workload(f"trace:path={p}").units(0))
    assert [u.at for u in units] == [0.0, 1.5]             # milliseconds
    a, b = (_text(u.stages[0][0]).split() for u in units)
    assert len(a) == 1100 and len(b) == 700
    assert a[:512] == b[:512] and a[512:700] != b[512:700]


def test_generic_trace_prefix_and_session(tmp_path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 0.0, "input_tokens": 50, "output_tokens": 5, "prefix_id": "sys", "prefix_tokens": 30},
        {"timestamp": 0.5, "input_tokens": 60, "output_tokens": 5, "prefix_id": "sys", "prefix_tokens": 30},
        {"timestamp": 1.0, "input_tokens": 20, "output_tokens": 5, "session_id": "s1"},
        {"timestamp": 2.0, "input_tokens": 40, "output_tokens": 5, "session_id": "s1"},
    ]) + "\n")
    t = [_text(u.stages[0][0]).split() for u in parse_workload(str(p)).units(0)]
    assert t[0][:30] == t[1][:30] and t[0][30:35] != t[1][30:35]
    assert t[3][:20] == t[2]


@pytest.mark.parametrize("content,match", [
    ('{"timestamp": 0, "input_tokens": 5, "output_tokens": 1}\n{"timestamp": 1, "input_tokens": 5\n',
     r"t\.jsonl:2: invalid JSON"),
    ('{"timestamp": 0, "input_tokens": 5, "output_tokens": 1}\n\n{"timestamp": 1, "output_tokens": 3}\n',
     r"t\.jsonl:3: missing input"),
    ('{"timestamp": 0, "input_tokens": -5, "output_tokens": 1}\n', r"t\.jsonl:1: input length must be >= 1"),
    ('{"timestamp": "yesterday", "input_tokens": 5, "output_tokens": 1}\n', r"t\.jsonl:1: timestamp"),
    ("", "no requests"),
])
def test_bad_trace_files_name_the_line(tmp_path, content: str, match: str) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text(content)
    with pytest.raises(TraceError, match=match):
        load_trace(p)


def test_bad_csv_trace_line(tmp_path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("timestamp,input_tokens,output_tokens\n0,5,5\n1,five,5\n")
    with pytest.raises(TraceError, match=r"t\.csv:3: input length 'five'"):
        load_trace(p)


def test_slo_parsing() -> None:
    slo = parse_slo("ttft=200ms,tpot=0.05s,e2e=3000,attainment=90%")
    assert slo.limits_s == pytest.approx({"ttft": 0.2, "tpot": 0.05, "e2e": 3.0})   # bare numbers are ms
    assert slo.attainment == pytest.approx(0.9)


@pytest.mark.parametrize("spec,match", [
    ("", "empty"), ("ttft", "key=value"), ("latency=5ms", "unknown SLO metric"), ("ttft=fast", "duration"),
    ("ttft=0ms", "positive"), ("ttft=-5ms", "duration"), ("ttft=1s,e2e=500ms", "impossible"),
    ("ttft=1s,attainment=1.5", "attainment"), ("attainment=0.9", "names no metric"), ("ttft=1s,ttft=2s", "twice"),
])
def test_impossible_or_malformed_slo_specs(spec: str, match: str) -> None:
    with pytest.raises(SLOError, match=match):
        parse_slo(spec)


def test_constant_arrivals_are_exact_and_poisson_has_the_right_mean() -> None:
    rng = np.random.default_rng(0)
    t = arrival_times("constant", 100, 10, rng)
    assert len(t) == 1000 and np.allclose(np.diff(t), 0.01)
    p = arrival_times("poisson", 200, 50, rng)
    assert len(p) / 50 == pytest.approx(200, rel=0.03)
    g = arrival_times("gamma", 200, 50, rng, burstiness=0.25)
    assert np.diff(g).std() / np.diff(g).mean() == pytest.approx(2.0, rel=0.15)   # CV = 1/sqrt(shape)
    with pytest.raises(ValueError):
        arrival_times("poisson", 0, 1, rng)


def _rec(sent: float, chunks: list[float], n: int | None = None, status: str = OK) -> RequestRecord:
    r = RequestRecord(index=0, unit=0, stage=0, scheduled=sent, sent=sent, status=status)
    r.chunk_times = chunks
    r.output_tokens = len(chunks) if n is None else n
    r.end = chunks[-1] if chunks else sent
    return r


def test_metric_definitions_on_a_known_request() -> None:
    r = _rec(1.0, [1.2, 1.25, 1.35, 1.4])
    assert r.ttft == pytest.approx(0.2)
    assert r.e2e == pytest.approx(0.4)
    assert r.tpot == pytest.approx(0.2 / 3)
    assert r.e2e_per_token == pytest.approx(0.1)          # guidellm's TPOT includes TTFT
    assert r.itls == pytest.approx([0.05, 0.1, 0.05])
    one = _rec(0.0, [0.3])
    assert one.tpot is None and one.itls.size == 0


def test_summary_pools_itl_and_counts_goodput() -> None:
    recs = [_rec(0.0, [0.1, 0.2, 0.3]), _rec(1.0, [1.5, 1.6]), _rec(2.0, [], status="http_500")]
    s = summarize(recs, (0.0, 4.0), parse_slo("ttft=200ms,tpot=150ms"))
    assert s["latency_s"]["itl"]["count"] == 3
    assert s["latency_s"]["ttft"]["mean"] == pytest.approx(0.3)
    assert s["requests"]["failed"] == 1
    assert s["slo"]["attainment"] == pytest.approx(1 / 3)
    assert s["slo"]["goodput_requests_per_s"] == pytest.approx(0.25)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(5 / 4)
    assert not meets(recs[2], parse_slo("e2e=100s"))


def test_parse_stream_prefers_usage_and_skips_role_chunk() -> None:
    r = RequestRecord(index=0, unit=0, stage=0, scheduled=0.0)
    lines = [(10.0, b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n'), (10.0, b"\n"),
             (10.1, b'data: {"choices":[{"delta":{"content":"Hi there"}}]}\n'),
             (10.2, b'data: {"choices":[{"delta":{"content":" you"}}]}\n'),
             (10.2, b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,'
                    b'"prompt_tokens_details":{"cached_tokens":4}}}\n'),
             (10.2, b"data: [DONE]\n")]
    parse_stream(r, lines, clock0=10.0)
    assert r.chunk_times == pytest.approx([0.1, 0.2]) and r.output_tokens == 3
    assert (r.prompt_tokens, r.cached_tokens) == (7, 4)
    r2 = RequestRecord(index=0, unit=0, stage=0, scheduled=0.0)
    parse_stream(r2, [(1.0, b'data: {"choices":[{"text":"a"}]}\n'), (1.1, b'data: {"choices":[{"text":"b"}]}\n')], 0.0)
    assert r2.output_tokens == 2 and r2.ok
    r3 = RequestRecord(index=0, unit=0, stage=0, scheduled=0.0)
    parse_stream(r3, [(1.0, b'data: {"error":{"message":"boom"}}\n')], 0.0)
    assert r3.status == "stream_error" and r3.error == "boom"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.001, 1.0), min_size=1, max_size=40), st.floats(0.0, 2.0))
def test_tpot_times_tokens_plus_ttft_is_e2e(gaps: list[float], ttft: float) -> None:
    chunks = list(np.cumsum([ttft, *gaps]) + 5.0)
    r = _rec(5.0, chunks)
    assert r.ttft + r.tpot * (r.output_tokens - 1) == pytest.approx(r.e2e)
    assert r.itls.sum() == pytest.approx(r.e2e - r.ttft)


@pytest.mark.parametrize("capacity,start", [(23.7, 1.0), (23.7, 50.0), (3.0, 8.0), (1000.0, 1.0)])
def test_goodput_search_brackets_the_capacity(capacity: float, start: float) -> None:
    from inferstack.bench.modes import search_max_rate

    probes: list[float] = []

    def probe(rate: float) -> bool:
        probes.append(rate)
        return rate <= capacity

    good, bad = search_max_rate(probe, start, precision=0.1, max_runs=20)
    assert good is not None and good <= capacity
    if bad is not None:
        assert bad > capacity and (bad - good) / bad <= 0.1


def test_goodput_search_reports_no_rate_when_even_the_lowest_fails() -> None:
    from inferstack.bench.modes import search_max_rate

    probes: list[float] = []
    good, bad = search_max_rate(lambda r: probes.append(r) or False, 4.0)
    assert good is None and bad == 1.0 and probes == [4.0, 2.0, 1.0]
