"""The simulator's scale paths change no result: columnar routing writes the same records as the Python
router, and token ids taken from the workload's word draws equal tokenizing the text."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from inferstack.bench.records import RequestRecord
from inferstack.bench.textgen import vocabulary
from inferstack.bench.workloads import RequestSpec, parse_workload
from inferstack.sim.prompts import WordTokens
from inferstack.sim.runner import SimArgs, build_settings
from inferstack.sim.simulation import Simulation


def _records(out: Path, routing: str, columnar: bool) -> tuple[str, dict[str, int]]:
    out.mkdir()
    # a small fleet under load (queues, ties, skew) with shared prefixes and sessions; two crashes (retries
    # route over a snapshot without the failed endpoint: the Python path, on views aged to the instant)
    args = SimArgs(fleet=["h100:llama-3-8b=12"], workload="multi-turn:turns=3,system=200,input=64,output=16",
                   rate=120.0, duration=2.0, seed=3, routing=routing, crash=["0@0.7+0.4", "5@1.1"])
    settings = build_settings(args, out)
    settings.columnar_routing = columnar
    sim = Simulation(settings)
    sim.run()
    assert (sim.gateway._snap is not None and sim.gateway._snap.columns is not None) == columnar
    return hashlib.sha256((out / "requests.stream.csv").read_bytes()).hexdigest(), sim.gateway.decisions


@pytest.mark.parametrize("routing", ["default", "round-robin"])
def test_columnar_routing_writes_the_same_records(tmp_path: Path, routing: str) -> None:
    fast = _records(tmp_path / "columns", routing, True)
    slow = _records(tmp_path / "python", routing, False)
    assert fast == slow
    assert sum(fast[1].values()) > 300


def test_word_ids_from_the_workload_equal_tokenizing_its_text() -> None:
    units = parse_workload("synthetic:input=uniform(1,300),output=8").units(7)
    tok = WordTokens()
    for _ in range(50):
        spec = next(units).stages[0][0]
        assert spec.word_ids is not None and len(spec.word_ids) == spec.input_tokens
        assert tok.encode_request(spec) == tok.encode(spec.messages)
    vocab = vocabulary()
    spec = RequestSpec([("user", f"{vocab[5]} {vocab[2]}")], 2, 1, word_ids=np.array([5, 2]))
    assert tok.encode_request(spec) == tok.encode(spec.messages) != tok.encode([("user", "")])


_PRECISE_CONFIG = """
pools:
  p:
    endpoints: [{url: "http://placeholder"}]
    routing: precise
    precise_prefix: {model_digest: "%s"}
routing:
  profiles:
    precise: {filters: [healthy], scorers: {precise-prefix: 3, in-flight: 1}, picker: max-score}
""" % ("ab" * 32)


def _digest_run(out: Path, digest: str, precise: bool) -> tuple[str, dict[str, int], int]:
    out.mkdir()
    config = None
    if precise:      # a profile scoring the precise index: fed the replicas' block hashes, it hashes prompts as they do
        config = out / "inferstack.yaml"
        config.write_text(_PRECISE_CONFIG)
    args = SimArgs(fleet=["h100:llama-3-8b=6"], workload="multi-turn:turns=3,system=200,input=64,output=40",
                   rate=60.0, duration=2.0, seed=5, routing="precise" if precise else "default",
                   crash=["2@0.9+0.3"], config=config)
    settings = build_settings(args, out)
    settings.kv_digest = digest
    sim = Simulation(settings)
    sim.run()
    assert all(r.layout.key_space.digest == digest for r in sim.replicas)
    hits = sum(r.counters()["prefix_cache_hits"] for r in sim.replicas)
    return hashlib.sha256((out / "requests.stream.csv").read_bytes()).hexdigest(), sim.gateway.decisions, hits


@pytest.mark.parametrize("precise", [False, True])
def test_the_cheap_block_digest_writes_the_same_records(tmp_path: Path, precise: bool) -> None:
    """Only the equalities of KV block hashes reach a simulation's results (prefix hits, the precise index),
    so the default xxh3-128 chain gives the records of the engines' SHA-256 chain, shared prefixes included."""
    cheap = _digest_run(tmp_path / "xxh3", "xxh3-128", precise)
    sha = _digest_run(tmp_path / "sha256", "sha256", precise)
    assert cheap == sha
    assert cheap[2] > 1_000      # prefix-cache hits (tokens): the hashes were compared, not only computed
    if precise:
        assert cheap[1].get("precise/precise-prefix", 0) > 20


def test_synthetic_words_drawn_per_batch_equal_a_draw_per_prompt() -> None:
    """The workload draws 256 prompts' words at once: the same words, lengths and ids as a draw per prompt
    (the reference below is the per-prompt generator), across batch boundaries."""
    from inferstack.bench.distributions import parse_length
    from inferstack.bench.textgen import word_indices, words_of

    def per_prompt(seed: int, inp: str, out: str):  # type: ignore[no-untyped-def]
        rng = np.random.default_rng(seed)
        i_dist, o_dist = parse_length(inp, "input"), parse_length(out, "output")
        while True:
            ins, outs = i_dist.sample(rng, 256), o_dist.sample(rng, 256)
            for i, o in zip(ins, outs, strict=True):
                ids = word_indices(int(i), rng)
                yield words_of(ids), int(i), int(o), ids

    for inp, out in (("uniform(1,40)", "uniform(1,9)"), ("lognormal(300,1)", "exponential(20)"), ("1000", "200")):
        units = parse_workload(f"synthetic:input={inp},output={out}").units(11)
        ref = per_prompt(11, inp, out)
        for _ in range(600):
            spec = next(units).stages[0][0]
            text, i, o, ids = next(ref)
            assert (spec.messages, spec.input_tokens, spec.output_tokens) == ([("user", text)], i, o)
            assert spec.word_ids is not None and spec.word_ids.tolist() == ids.tolist()


def test_prompt_token_ids_are_shared_int_objects() -> None:
    """A prompt's token ids are the vocabulary's id objects, not a thousand new ints per request (which a fleet
    keeps for every request in flight)."""
    units = parse_workload("synthetic:input=500,output=8").units(2)
    tok = WordTokens()
    a, b = (tok.encode_request(next(units).stages[0][0]) for _ in range(2))
    common = set(a[3:-5]) & set(b[3:-5])
    assert common
    for v in common:
        assert a[a.index(v)] is b[b.index(v)]


def _record(i: int, status: str, chunks: list[float], out: int, streamed: bool = True) -> RequestRecord:
    rec = RequestRecord(index=i, unit=i, stage=i % 2, scheduled=0.1 * i, sent=0.1 * i + 1e-7 * i, end=0.1 * i + 3.3,
                        status=status, error="" if status == "ok" else f"boom, {i}", input_tokens_nominal=7,
                        output_tokens_nominal=out, session="s" if i % 3 else None, group=None, included=i % 5 != 0)
    rec.chunk_times, rec.output_tokens, rec.streamed = chunks, out, streamed
    rec.prompt_tokens = None if i % 7 == 0 else 40 + i
    rec.cached_tokens = None if i % 4 == 0 else i
    return rec


def test_record_sink_batches_write_what_to_row_says(tmp_path: Path) -> None:
    """Rows, summary columns, sampled ITL gaps and counts from the batched sink equal `to_row` record by record
    (ragged chunk counts, one and no chunks, failures, unstreamed, zero and one output tokens), over several
    batches."""
    import csv

    from inferstack.sim import records as sim_records
    from inferstack.sim.records import RecordSink

    rng = np.random.default_rng(5)
    recs = []
    for i in range(2 * sim_records._BATCH + 77):
        n = int(rng.choice([0, 1, 2, 3, 9, 130, 200, 257]))
        chunks = (0.1 * i + 0.02 + np.cumsum(rng.exponential(0.008, n))).tolist()
        status = "ok" if i % 11 else "http_429"
        recs.append(_record(i, status, chunks, n if i % 13 else max(0, n - 1), streamed=i % 17 != 0))
    sink = RecordSink(tmp_path / "r.csv", sample_every=3)
    for rec in recs:
        sink.add(rec)
    sink.close()
    want = tmp_path / "want.csv"
    with want.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(recs[0].to_row()))
        for rec in recs:
            w.writerow(list(rec.to_row().values()))
    assert (tmp_path / "r.csv").read_bytes() == want.read_bytes()
    nan = float("nan")
    rows = [rec.to_row() for rec in recs]
    for key in ("ttft", "tpot", "e2e", "e2e_per_token", "itl_mean"):
        want_col = np.array([nan if r[key + "_s"] is None else r[key + "_s"] for r in rows])
        np.testing.assert_array_equal(sink.column(key), want_col)
    np.testing.assert_array_equal(sink.column("lag"), [r.schedule_lag for r in recs])
    sampled = [r for k, r in enumerate(recs) if k % 3 == 0]
    assert sink.samples == sampled
    assert sink.itl_gaps.tolist() == [g for r in sampled if r.ok and r.included for g in r.itls.tolist()]
    assert sink.count == len(recs) and list(sink.ok) == [r.ok for r in recs]
