"""The drift of a shared host's speed (`sim.cores.HostSpeed`, `Hardware.speed_jitter`) and its fit from the step
logs of serving engines (`sim.calibrate.fit_speed_jitter`)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from inferstack.sim.calibrate import StepSample, fit_speed_jitter
from inferstack.sim.cores import CoreShare, HostSpeed
from inferstack.sim.hardware import Hardware, get_hardware, load_hardware_file, save_hardware_file
from inferstack.sim.models import get_model
from inferstack.sim.perf_model import SeqWork, step_time

MODEL = "smollm2-135m"


def test_the_speed_factor_has_mean_one_the_fitted_spread_and_correlation():
    speed = HostSpeed(0.1, 2.0, 0.6, "1/box")
    logs = [math.log(speed.factor(2.0 * i + 0.5)) for i in range(20000)]
    factors = [math.exp(x) for x in logs]
    assert statistics.fmean(factors) == pytest.approx(1.0, abs=0.01)
    assert statistics.stdev(logs) == pytest.approx(0.1, rel=0.05)
    mean = statistics.fmean(logs)
    lag1 = statistics.fmean((a - mean) * (b - mean) for a, b in itertools.pairwise(logs))
    assert lag1 / statistics.pvariance(logs) == pytest.approx(0.6, abs=0.03)
    assert speed.factor(0.0) == speed.factor(1.999) != speed.factor(2.0)      # constant over a window


def test_the_factor_depends_on_the_seed_only_not_on_the_order_it_is_asked_in():
    ahead, in_order = HostSpeed(0.2, 5.0, 0.3, "7/box"), HostSpeed(0.2, 5.0, 0.3, "7/box")
    late = ahead.factor(99.0)
    assert [in_order.factor(5.0 * i) for i in range(20)][-1] == late
    assert HostSpeed(0.2, 5.0, 0.3, "7/other").factor(99.0) != late
    assert HostSpeed(0.0, 5.0, 0.3, "7/box").factor(99.0) == 1.0


def test_a_step_on_a_drifting_host_takes_its_window_s_factor_times_its_work():
    speed = HostSpeed(0.3, 1.0, 0.0, "3/box")
    share: CoreShare[str] = CoreShare(speed)
    f = speed.factor(2.5)
    assert f != 1.0
    assert share.start("a", 0.2, 0.5, 2.5) == [("a", pytest.approx(2.5 + 0.2 * f), 1)]
    added, moved = share.end("a", 2.5 + 0.2 * f)
    assert added == pytest.approx(0.2 * (f - 1.0)) and moved == []


def _drifting_log(path: Path, hw: Hardware, sigma: float, corr: float, scatter: float, seconds: float) -> Path:
    """One engine stepping back to back at ``hw``'s prices times the window factor of a known drift (5 s windows)
    times a per-step log-normal scatter, decode batches of 1-4 and a prompt now and then."""
    rng, model = random.Random(9), get_model(MODEL)
    speed = HostSpeed(sigma, hw.speed_jitter_s, corr, "drift")
    shapes = [(SeqWork(160, 1),) * b for b in range(1, 5)] + [(SeqWork(0, 96),), (SeqWork(128, 40),)]
    lines, t = [], 1000.0
    while t < 1000.0 + seconds:
        work = rng.choice(shapes)
        d = step_time(model, hw, list(work)) * speed.factor(t - 1000.0) * math.exp(rng.gauss(0.0, scatter))
        lines.append(json.dumps({"work": [[w.context, w.new_tokens, int(w.samples)] for w in work], "start": t,
                                 "step_s": d, "busy": True}))
        t += d
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("sigma", "corr"), [(0.08, 0.5), (0.0, 0.0)])
def test_the_fit_recovers_a_known_drift_through_the_steps_own_scatter(tmp_path, sigma, corr):
    """At the true prices (`fit_speed_jitter` alone): the window spread less the 6 % per-step scatter's share
    is the drift's sigma, consecutive windows its correlation; no drift gives (about) none."""
    hw = get_hardware("cpu")
    log = _drifting_log(tmp_path / "e.jsonl", hw, sigma, corr, 0.06, 1500.0)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    timed = [(r["start"], StepSample(tuple(SeqWork(c, n, bool(s)) for c, n, s in r["work"]), r["step_s"]))
             for r in lines]
    got_sigma, got_corr = fit_speed_jitter(get_model(MODEL), hw, timed)
    assert got_sigma == pytest.approx(sigma, abs=0.015)
    assert got_corr == pytest.approx(corr, abs=0.2)


def test_served_steps_calibration_writes_the_drift(tmp_path):
    """End to end through `engine calibrate --served-steps` (prices fitted too, at the drift's mean): the
    profile carries the drift; two minutes of steps (24 windows) pin it to a few hundredths."""
    from typer.testing import CliRunner

    from inferstack.cli.main import app

    log = _drifting_log(tmp_path / "e.jsonl", get_hardware("cpu"), 0.1, 0.0, 0.03, 120.0)
    out = tmp_path / "cpu.json"
    result = CliRunner().invoke(app, ["engine", "calibrate", "--model", MODEL, "--out", str(out),
                                      "--served-steps", str(log)])
    assert result.exit_code == 0, result.output
    hw = load_hardware_file(out)
    assert hw.speed_jitter == pytest.approx(0.1, abs=0.04)
    assert f"host speed drift sigma {hw.speed_jitter:.3f} per 5 s" in result.output


def _run(tmp: Path, profile: Path, host: str, name: str) -> list[dict]:
    from inferstack.sim.runner import SimArgs, build_settings, simulate

    trace = tmp / "t.jsonl"
    if not trace.exists():
        rng, t, rows = random.Random(2), 0.0, []
        for _ in range(40):
            t += rng.expovariate(2.0)
            rows.append(json.dumps({"timestamp": round(t, 6), "input_tokens": rng.randint(40, 200),
                                    "output_tokens": rng.randint(4, 30)}))
        trace.write_text("\n".join(rows) + "\n")
    out = tmp / name
    out.mkdir()
    settings = build_settings(SimArgs(fleet=[f"{profile}:{MODEL}=2@{host}"], workload=f"trace:path={trace}",
                                      rate=None, duration=0.0, routing="round-robin", seed=3), out)
    simulate(settings)
    return (out / "requests.stream.csv").read_text().splitlines()


def test_a_drifting_host_replays_bit_for_bit_and_its_name_draws_another_drift(tmp_path):
    cpu = dataclasses.replace(get_hardware("cpu"), colocation_slowdown=0.1)
    steady, drifting = tmp_path / "steady.json", tmp_path / "drifting.json"
    save_hardware_file(cpu, steady)
    save_hardware_file(dataclasses.replace(cpu, speed_jitter=0.2, speed_jitter_s=1.0, speed_jitter_corr=0.5),
                       drifting)
    base = _run(tmp_path, steady, "box", "steady")
    first = _run(tmp_path, drifting, "box", "first")
    assert len(first) == len(base) == 41
    assert _run(tmp_path, drifting, "box", "again") == first
    assert first != base and _run(tmp_path, drifting, "other", "other") != first
    assert _run(tmp_path, steady, "other", "steady-other") == base


def test_a_lone_request_on_a_drifting_host_takes_its_window_s_factor_times_as_long(tmp_path):
    """One replica, one short request inside the first 10 s window: every step is scaled by that window's
    factor, so TTFT and E2E are that factor times the steady host's."""
    from inferstack.sim.runner import SimArgs, build_settings, simulate

    cpu = get_hardware("cpu")
    steady, drifting = tmp_path / "steady.json", tmp_path / "drifting.json"
    save_hardware_file(cpu, steady)
    save_hardware_file(dataclasses.replace(cpu, speed_jitter=0.3, speed_jitter_s=10.0), drifting)
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"timestamp": 0.0, "input_tokens": 100, "output_tokens": 6}) + "\n")
    rows = []
    for profile in (steady, drifting):
        out = tmp_path / profile.stem
        out.mkdir()
        simulate(build_settings(SimArgs(fleet=[f"{profile}:{MODEL}=1@box"], workload=f"trace:path={trace}",
                                        rate=None, duration=0.0, routing="round-robin", seed=3), out))
        rows.append(dict(zip(*[x.split(",") for x in (out / "requests.stream.csv").read_text().splitlines()],
                             strict=True)))
    f = HostSpeed(0.3, 10.0, 0.0, "3/box").factor(0.0)
    assert float(rows[0]["e2e_s"]) < 10.0 and f != 1.0
    for col in ("ttft_s", "e2e_s"):
        assert float(rows[1][col]) == pytest.approx(f * float(rows[0][col]), rel=1e-9)
