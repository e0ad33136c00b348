"""The emulated engine behind the real HTTP server: same API and /metrics, several engines in one
process, deterministic output, timings from the performance model, measured by `inferstack bench`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.support.procs import Server, start_inferstack
from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.sim.perf_model import SeqWork, step_time
from inferstack.sim.profile import parse_profile

PROFILE = "h100:llama-3-8b"


@pytest.fixture(scope="module")
def step_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("steps") / "steps.jsonl"


@pytest.fixture(scope="module")
def fleet(step_log: Path) -> Iterator[Server]:
    srv = start_inferstack(["engine", "serve", "--emulate", PROFILE, "--emulate-count", "2",
                            "--step-log", str(step_log)])
    yield srv
    srv.stop()


def test_fleet_lists_every_engine_and_reports_the_profile_model(fleet: Server) -> None:
    assert len(fleet.urls) == 2 and len(set(fleet.urls)) == 2
    for url in fleet.urls:
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["meta-llama/Meta-Llama-3-8B-Instruct"]
        assert httpx.get(url + "/ready").status_code == 200


def test_output_is_deterministic_and_exactly_max_tokens(fleet: Server) -> None:
    body = {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "prompt": "hello there", "max_tokens": 12,
            "temperature": 0.7}
    a = httpx.post(fleet.urls[0] + "/v1/completions", json=body, timeout=30).json()
    b = httpx.post(fleet.urls[1] + "/v1/completions", json=body, timeout=30).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["choices"][0]["text"].strip()
    assert a["usage"]["completion_tokens"] == 12
    assert a["usage"]["prompt_tokens"] == 2          # SmolLM2 tokenizer: "hello", " there"


def test_bench_against_the_emulated_fleet(fleet: Server, tmp_path: Path) -> None:
    targets = [a for u in fleet.urls for a in ("--target", u)]
    res = CliRunner().invoke(app, ["bench", "run", *targets, "--workload",
                                   "shared-prefix:groups=2,users=4,system=256,question=32,output=32",
                                   "--rate", "4", "--arrival", "constant", "--duration", "3", "--endpoint",
                                   "completions", "--out", str(tmp_path), "--no-progress", "--no-plots",
                                   "--scrape-interval", "0.5"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    s = data["summary"]
    assert s["requests"]["failed"] == 0 and s["requests"]["completed"] == 12
    assert {r["target"] for r in data["requests"]} == set(fleet.urls)
    assert all(r["output_tokens"] == 32 for r in data["requests"])
    # decode steps take at least what the model predicts for one sequence (they can only be slower)
    profile = parse_profile(PROFILE)
    floor = step_time(profile.model, profile.hardware, [SeqWork(300, 1)])
    assert s["latency_s"]["tpot"]["p50"] >= 0.9 * floor
    assert s["latency_s"]["tpot"]["p50"] < 10 * floor
    # the real prefix cache works behind the emulator: groups share a 256-token system prompt
    assert data["server"]["available"] and data["server"]["prefix_cache_hit_rate"] > 0.3


@pytest.mark.slow
def test_served_model_name() -> None:
    # the refusals of bad --emulate settings: tests/unit/test_engine_server_cli.py (no process needed)
    srv = start_inferstack(["engine", "serve", "--emulate", "cpu:smollm2-135m", "--served-model-name", "tiny"])
    try:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        srv.stop()


def test_each_engine_of_the_fleet_logs_its_own_steps(fleet: Server, step_log: Path) -> None:
    """Served step times are start to next start of one engine: engine 1 writes FILE.1, not into engine 0's file."""
    body = {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "prompt": "hello there", "max_tokens": 4}
    for url in fleet.urls:
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200
    logs = [step_log, step_log.with_name(step_log.name + ".1")]
    for log in logs:   # each line is written once its step ends, before the response completes
        starts = [json.loads(line)["start"] for line in log.read_text().splitlines()]
        assert len(starts) >= 4 and starts == sorted(starts), log
