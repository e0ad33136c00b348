"""The engine's step log (`engine serve --step-log`) and the served step samples the simulator's `cpu`
profile is fitted on (`sim.calibrate.served_step_samples`)."""

from __future__ import annotations

import json

import pytest

from inferstack.engine.config import EngineConfig
from inferstack.engine.executor.emulated import build_emulated_engine
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams
from inferstack.sim.calibrate import StepSample, load_step_samples, served_step_samples
from inferstack.sim.perf_model import SeqWork
from inferstack.sim.profile import parse_profile


def test_engine_logs_every_step_with_its_shape_and_times(tmp_path) -> None:
    log = tmp_path / "steps.jsonl"
    built = build_emulated_engine(EngineConfig(model="smollm2-135m", device="cpu", step_log=str(log)),
                                  parse_profile("cpu:smollm2-135m"), realtime=False)
    core = built.core
    for i in range(2):
        core.add_request(Request(f"r{i}", list(range(100 + i, 140 + i)),
                                 SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), arrival_time=0.0))
    steps = 0
    while core.has_unfinished():
        steps += len(core.step()) > 0
    core.shutdown()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == steps == 3
    # the prefill of both prompts (40 new tokens each, sampled), then two decode steps of both
    assert lines[0]["work"] == [[0, 40, 1], [0, 40, 1]]
    assert lines[1]["work"] == [[40, 1, 1], [40, 1, 1]] and lines[2]["work"] == [[41, 1, 1], [41, 1, 1]]
    assert [x["busy"] for x in lines] == [True, True, False]
    assert all(0 <= x["seconds"] <= x["step_s"] for x in lines)
    assert [x["start"] for x in lines] == sorted(x["start"] for x in lines)
    # the forward-pass times read as calibration samples as they are
    assert load_step_samples(log)[0].work == (SeqWork(0, 40), SeqWork(0, 40))


def _line(work: list[list[int]], start: float, step_s: float, busy: bool) -> str:
    return json.dumps({"work": work, "seconds": step_s / 2, "start": start, "step_s": step_s, "busy": busy}) + "\n"


def test_served_samples_price_each_step_start_to_next_start_while_busy(tmp_path) -> None:
    log = tmp_path / "steps.jsonl"
    log.write_text(_line([[0, 32, 1]], 10.0, 0.30, True)         # host work after it: 0.05 s
                   + _line([[32, 1, 1]], 10.35, 0.04, False)     # idle after it: the step itself
                   + _line([[0, 32, 1]], 12.0, 0.25, True)
                   + _line([[32, 1, 1], [0, 8, 1]], 12.26, 0.08, False))
    samples = served_step_samples(log, skip=0)
    assert samples == [StepSample((SeqWork(0, 32),), pytest.approx(0.35)), StepSample((SeqWork(32, 1),), 0.04),
                       StepSample((SeqWork(0, 32),), pytest.approx(0.26)),
                       StepSample((SeqWork(32, 1), SeqWork(0, 8)), 0.08)]
    assert served_step_samples(log) == samples[2:]


def test_served_samples_name_the_bad_line(tmp_path) -> None:
    log = tmp_path / "steps.jsonl"
    log.write_text(_line([[0, 32, 1]], 1.0, 0.3, True) + '{"work": [[0, 32, 1]], "seconds": 0.1}\n')
    with pytest.raises(ValueError, match=rf"{log}:2: not a step-log line"):
        served_step_samples(log)


def test_calibrate_fits_served_step_logs(tmp_path) -> None:
    """`engine calibrate --served-steps LOG...` fits the profile on what the engines spent serving: steps 1.3x
    the catalog `cpu` model, each followed by 2 ms of host work, give back that cost per shape."""
    from typer.testing import CliRunner

    from inferstack.cli.main import app
    from inferstack.sim.hardware import get_hardware, load_hardware_file
    from inferstack.sim.perf_model import step_time

    model, cpu = parse_profile("cpu:smollm2-135m").model, get_hardware("cpu")
    shapes = [[[0, n, 1]] * b for n in (32, 96, 288) for b in (1, 2)] + [[[300, 1, 1]] * b for b in range(1, 9)]
    logs, start = [tmp_path / "engine0.jsonl", tmp_path / "engine1.jsonl"], 100.0
    for log in logs:
        lines = ""
        for work in shapes * 3:
            t = 1.3 * step_time(model, cpu, [SeqWork(c, n, bool(s)) for c, n, s in work])
            lines += _line(work, start, t, True)
            start += t + 0.002
        log.write_text(lines)
    out = tmp_path / "cpu.json"
    result = CliRunner().invoke(app, ["engine", "calibrate", "--model", "smollm2-135m", "--out", str(out),
                                      *[x for log in logs for x in ("--served-steps", str(log))]])
    assert result.exit_code == 0, result.output
    assert "steps" in result.output
    fitted = load_hardware_file(out)
    for work in shapes:
        seqs = [SeqWork(c, n, bool(s)) for c, n, s in work]
        assert step_time(model, fitted, seqs) == pytest.approx(1.3 * step_time(model, cpu, seqs) + 0.002, rel=0.08)
    missing = CliRunner().invoke(app, ["engine", "calibrate", "--served-steps", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "nope.jsonl: cannot read step log" in missing.output


def test_mean_unbiased_fit_prices_noisy_steps_at_their_mean() -> None:
    """Served steps of one shape scatter (neighbours on the cores): weighting by 1/measured fits them below
    their mean (the fast ones count more), which shortens every simulated latency; the served fit prices
    them at their mean."""
    from inferstack.sim.calibrate import fit_hardware
    from inferstack.sim.hardware import get_hardware
    from inferstack.sim.perf_model import step_time

    model, cpu = parse_profile("cpu:smollm2-135m").model, get_hardware("cpu")
    shapes = [(SeqWork(0, n),) * b for n in (32, 128) for b in (1, 2)] + [(SeqWork(200, 1),) * b for b in (1, 2, 4)]
    samples = [StepSample(w, k * step_time(model, cpu, w)) for w in shapes for k in (0.7, 1.3)]
    _, plain = fit_hardware(model, samples, cpu)
    _, served = fit_hardware(model, samples, cpu, mean_unbiased=True)
    assert plain["mean_ratio"] < 0.9
    assert served["mean_ratio"] == pytest.approx(1.0, abs=0.03)


def test_serve_refuses_a_step_log_it_cannot_write(tmp_path) -> None:
    """Named at once with exit 2, not reported later as a model that could not load."""
    from typer.testing import CliRunner

    from inferstack.cli.main import app

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["engine", "serve", "--emulate", "cpu:smollm2-135m", "--port", "0",
                                      "--step-log", str(blocker / "steps.jsonl")])
    assert result.exit_code == 2 and "--step-log" in result.output and "cannot write" in result.output
