"""The local actuator's pure parts: config section (file:line errors), status → metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from inferstack.autoscale.decision import Decision
from inferstack.autoscale.metrics import AutoscalerCollector, AutoscalerStatus, reason_label
from inferstack.config import ConfigError, load_config


def test_autoscale_section_errors_name_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "inferstack.yaml"
    cfg.write_text("up:\n  emulate: h100:llama-3-8b\n  autoscale:\n    policy: kpa:targt=8\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value).startswith(f"{cfg}:4: up.autoscale.policy: Value error, kpa: unknown key 'targt'")
    cfg.write_text("up:\n  autoscale:\n    policy: kpa\n    min_replicas: 3\n    max_replicas: 2\n")
    with pytest.raises(ConfigError, match=r":3: up.autoscale: .*min_replicas \(3\) is above max_replicas \(2\)"):
        load_config(cfg)


def test_autoscale_section_defaults_and_pd_clash(tmp_path: Path) -> None:
    cfg = tmp_path / "inferstack.yaml"
    cfg.write_text("up:\n  autoscale:\n    policy: slo:ttft_p95=1s,tpot_p95=100ms\n    min_replicas: 0\n")
    a = load_config(cfg).up.autoscale
    assert a is not None and (a.min_replicas, a.max_replicas, a.idle_s, a.interval_s) == (0, 4, 300.0, 2.0)
    assert a.make_policy().ttft_p95_s == 1.0 and a.make_policy().tpot_p95_s == pytest.approx(0.1)
    assert a.hold().timeout_s == 60.0 and a.bounds().min_replicas == 0
    cfg.write_text("up:\n  pd: {prefill: 1, decode: 1}\n  autoscale: {policy: kpa}\n")
    with pytest.raises(ConfigError, match="autoscale scales colocated replicas"):
        load_config(cfg)


def test_status_exports_desired_actual_and_bounded_decision_reasons() -> None:
    status = AutoscalerStatus("default", "both", "kpa", ready=1, starting=1)
    status.decided(Decision("kpa", 1, 3, "panic: 6s demand wants 12"))
    status.decided(Decision("kpa", 1, 3, "panic: 6s demand wants 14"))
    status.decided(Decision("kpa", 3, 3, "60s demand over target 8 per replica"))
    assert reason_label("p95 latency at 1.25x its objective") == "p95 latency at Nx its objective"
    again = AutoscalerStatus.from_json("default", status.to_json())  # what the gateway gets over the admin API
    reg = CollectorRegistry()
    reg.register(AutoscalerCollector(lambda: [again]))
    text = generate_latest(reg).decode()
    assert 'inferstack_autoscaler_desired_replicas{policy="kpa",pool="default",role="both"} 3.0' in text
    assert 'inferstack_autoscaler_replicas{pool="default",role="both",state="starting"} 1.0' in text
    assert ('inferstack_autoscaler_decisions_total{direction="up",policy="kpa",pool="default",'
            'reason="panic: Ns demand wants N",role="both"} 2.0') in text
    assert 'direction="hold"' in text
    with pytest.raises(ValueError):
        AutoscalerStatus.from_json("default", {"policy": "kpa", "ready": -1})


def test_dashboard_charts_desired_vs_actual_replicas_and_held_requests() -> None:
    from inferstack.gateway.pipeline.hold import HoldMetrics
    from inferstack.telemetry.dashboard_state import DashboardHistory

    reg = CollectorRegistry()
    status = AutoscalerStatus("default", "both", "kpa", ready=1, starting=2)
    status.decided(Decision("kpa", 1, 3, "panic: 6s demand wants 3"))
    reg.register(AutoscalerCollector(lambda: [status]))
    HoldMetrics(reg).held.labels("default").set(4)
    hist = DashboardHistory(window_s=10, history_s=60)
    for now in (100.0, 101.0):
        hist.ingest({"gateway": {"metrics": generate_latest(reg).decode()}, "endpoints": []}, now=now)
    series = hist.render()["charts"]["replicas"]["series"]
    assert {k: v[-1][1] for k, v in series.items()} == {"desired": 3.0, "ready": 1.0, "starting": 2.0,
                                                        "draining": 0.0, "held requests": 4.0}


def test_hold_bounds_deadline_release_and_header() -> None:
    import asyncio

    from inferstack.autoscale.config import HoldConfig
    from inferstack.config.schema import GatewayConfig, PoolConfig
    from inferstack.gateway.datalayer import Pool
    from inferstack.gateway.pipeline.hold import HOLD_TIMEOUT_HEADER, Hold, HoldMetrics
    from inferstack.protocol.errors import APIError

    pool = Pool.from_config("p", PoolConfig(endpoints=["http://127.0.0.1:9"]), GatewayConfig())
    pool.endpoints[0].active_ok = False            # the pool has no ready endpoint
    hold = Hold(pool, HoldConfig(timeout_s=5, max_held=1), HoldMetrics(CollectorRegistry()))

    async def scenario() -> tuple[float | None, APIError, APIError, APIError]:
        first = asyncio.create_task(hold.wait({}, None))
        while hold.held == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(APIError) as full:
            await hold.wait({}, None)
        pool.endpoints[0].active_ok = True       # a replica joined; the next refresh pumps
        hold.pump()
        waited = await first
        pool.endpoints[0].active_ok = False
        with pytest.raises(APIError) as late:
            await hold.wait({HOLD_TIMEOUT_HEADER: b"0.05"}, None)
        with pytest.raises(APIError) as bad:
            await hold.wait({HOLD_TIMEOUT_HEADER: b"soon"}, None)
        return waited, full.value, late.value, bad.value

    waited, full, late, bad = asyncio.run(scenario())
    assert waited is not None and waited >= 0 and hold.held == 0
    assert (full.status, full.code) == (503, "cold_start_queue_full")
    assert (late.status, late.code) == (504, "cold_start_timeout") and "within 0.05s" in late.message
    assert bad.status == 400
