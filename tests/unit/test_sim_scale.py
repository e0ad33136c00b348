"""The simulator's scale paths change no result: columnar routing writes the same records as the Python
router, and token ids taken from the workload's word draws equal tokenizing the text."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

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
