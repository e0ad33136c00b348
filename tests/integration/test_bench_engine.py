"""`inferstack bench` against the real engine serving the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inferstack.cli.main import app
from support.procs import Server


@pytest.mark.slow
def test_bench_measures_the_real_engine(tmp_path: Path, real_engine: Server) -> None:
    res = CliRunner().invoke(app, ["bench", "run", "--target", real_engine.url, "--workload",
                                   "multi-turn:turns=2,system=48,input=16,output=6", "--concurrency", "2",
                                   "--duration", "4", "--out", str(tmp_path), "--no-progress",
                                   "--scrape-interval", "0.5"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    s = data["summary"]
    assert s["requests"]["completed"] >= 2 and s["requests"]["failed"] == 0
    assert s["latency_s"]["ttft"]["mean"] > 0 and s["latency_s"]["itl"]["count"] > 0
    done = [r for r in data["requests"] if r["status"] == "ok"]
    assert all(r["prompt_tokens"] > r["input_tokens_nominal"] for r in done)   # chat template adds tokens
    assert all(1 <= r["output_tokens"] <= 6 for r in done)
    # second turns repeat the first turn's prompt: the engine's prefix cache reports hits
    assert data["server"]["available"]
    assert data["server"]["counter_deltas"]["vllm:prefix_cache_queries"] > 0
    assert (tmp_path / "latency_cdf.png").stat().st_size > 1000
