"""Gateway workers: each worker's share of the caps, the refused combinations, the RPM/TPM buckets
shared between forked processes, and the merge of the workers' metrics into one exposition."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferstack.config.loader import ConfigError, parse_config
from inferstack.config.schema import InferstackConfig
from inferstack.gateway.limits import Limits, SharedMemoryLimiter
from inferstack.gateway.metricsmerge import merge_expositions
from inferstack.gateway.workershare import share, worker_config


@pytest.mark.parametrize(("total", "workers", "expected"), [
    (8, 2, [4, 4]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (2, 2, [1, 1]), (64, 4, [16, 16, 16, 16]),
])
def test_shares_add_up_and_differ_by_at_most_one(total, workers, expected):
    parts = [share(total, workers, i) for i in range(workers)]
    assert parts == expected
    assert sum(parts) == total


def test_share_rejects_an_index_outside_the_workers():
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        share(4, 2, 2)


def _cfg(**gateway) -> InferstackConfig:
    return InferstackConfig.model_validate({
        "gateway": gateway,
        "pools": {"capped": {"endpoints": [{"url": "http://127.0.0.1:1"}], "max_concurrency": 5},
                  "open": {"endpoints": [{"url": "http://127.0.0.1:2"}]}},
        "audit": {"directory": "/var/audit"},
    })


def test_worker_config_splits_caps_turns_the_admin_api_off_and_gives_each_worker_its_audit_chain():
    cfg = _cfg(workers=2)
    w0, w1 = worker_config(cfg, 0), worker_config(cfg, 1)
    assert (w0.pools["capped"].max_concurrency, w1.pools["capped"].max_concurrency) == (3, 2)
    assert w0.pools["open"].max_concurrency is None
    assert w0.gateway.admin_api is False
    assert (w0.audit.directory, w1.audit.directory) == (Path("/var/audit/worker-0"), Path("/var/audit/worker-1"))
    assert worker_config(_cfg(), 0) == _cfg()  # one worker: the config as written


def test_combinations_workers_cannot_share_are_refused_at_their_line():
    text = ("gateway:\n  workers: 3\n  admin_api: true\npools:\n  p:\n    endpoints: [{url: 'http://127.0.0.1:1'}]\n"
            "    max_concurrency: 2\n")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "gw.yaml")
    problems = err.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("gw.yaml:3: gateway.admin_api: ")
    assert problems[1].startswith("gw.yaml:7: pools.p.max_concurrency: 2 is below gateway.workers (3)")
    assert parse_config(text.replace("workers: 3", "workers: 2").replace("admin_api: true", "admin_api: false"))


def test_shared_buckets_hold_one_limit_across_forked_workers():
    limiter = SharedMemoryLimiter(["a", "b"])
    limits = Limits(rpm=5, tpm=1000)

    def take(n: int) -> list[float]:
        return [asyncio.run(limiter.acquire("a", limits, 100))[0] for _ in range(n)]

    assert take(3) == [0.0, 0.0, 0.0]
    pid = os.fork()
    if pid == 0:  # another worker: two more fit the limit of 5, the third does not
        waits = take(3)
        os._exit(0 if waits[:2] == [0.0, 0.0] and waits[2] > 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait, which = asyncio.run(limiter.acquire("a", limits, 100))
    assert which == "rpm" and 0 < wait <= 12.0  # 1 request per 12 s refills
    assert asyncio.run(limiter.acquire("b", limits, 100)) == (0.0, "")  # tenants do not share buckets
    asyncio.run(limiter.settle("b", limits, 850))  # used 950 of 1000 tokens in all
    wait, which = asyncio.run(limiter.acquire("b", limits, 100))
    assert which == "tpm" and wait > 0


def _worker_text(requests: int, latency: float, healthy: int, queued: int) -> str:
    r = CollectorRegistry()
    Counter("inferstack_gateway_requests", "Requests.", ("pool", "status"), registry=r).labels("p", "200").inc(requests)
    Histogram("gen_ai_server_request_duration_seconds", "E2E.", buckets=(0.01, 0.1), registry=r).observe(latency)
    Gauge("inferstack_audit_writer_healthy", "Writer up.", registry=r).set(healthy)
    Gauge("inferstack_gateway_queue_depth", "Queued.", registry=r).set(queued)
    return generate_latest(r).decode()


def test_merge_adds_counters_histograms_and_queues_and_keeps_the_worst_health():
    merged = merge_expositions([_worker_text(3, 0.005, 1, 2), _worker_text(4, 0.05, 0, 5)]).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(merged) for s in fam.samples}
    assert samples[("inferstack_gateway_requests_total", (("pool", "p"), ("status", "200")))] == 7
    assert samples[("gen_ai_server_request_duration_seconds_bucket", (("le", "0.01"),))] == 1
    assert samples[("gen_ai_server_request_duration_seconds_bucket", (("le", "0.1"),))] == 2
    assert samples[("gen_ai_server_request_duration_seconds_count", ())] == 2
    assert samples[("gen_ai_server_request_duration_seconds_sum", ())] == pytest.approx(0.055)
    assert samples[("inferstack_audit_writer_healthy", ())] == 0
    assert samples[("inferstack_gateway_queue_depth", ())] == 7
    assert "# TYPE inferstack_gateway_requests_total counter" in merged


def test_the_workers_flag_is_checked_against_the_config(tmp_path):
    from typer.testing import CliRunner

    from inferstack.cli.main import app

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("pools:\n  p:\n    endpoints: [http://127.0.0.1:1]\n    max_concurrency: 1\n")
    out = CliRunner().invoke(app, ["gateway", "serve", "--config", str(cfg), "--workers", "2"])
    assert out.exit_code == 2
    assert "pools.p.max_concurrency: 1 is below gateway.workers (2)" in out.output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_error_line_not_a_traceback(tmp_path, workers):
    import socket

    from typer.testing import CliRunner

    from inferstack.cli.main import app

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("pools:\n  p:\n    endpoints: [http://127.0.0.1:1]\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = CliRunner().invoke(app, ["gateway", "serve", "--config", str(cfg), "--port", str(port),
                                       "--workers", workers])
    assert out.exit_code == 1
    assert f"error: cannot bind 127.0.0.1:{port}: Address already in use" in out.output
    assert "Traceback" not in out.output
