"""The `cpu` profile of the bundled model: the calibration fit on steps recorded from the real engine,
the profile file the simulator loads (and the CPU engine's batch cap it implies), and file:line errors
for bad profile files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.sim.calibrate import StepSample, fit_hardware, load_step_samples, save_step_samples
from inferstack.sim.hardware import HardwareFileError, get_hardware, load_hardware_file, save_hardware_file
from inferstack.sim.perf_model import SeqWork, step_time
from inferstack.sim.profile import parse_profile
from inferstack.sim.runner import SimArgs, build_settings

RECORDED = Path(__file__).parents[1] / "data" / "cpu_steps_smollm2_135m.jsonl"
MODEL = parse_profile("h100:smollm2-135m").model


@pytest.fixture(scope="module")
def fitted():
    samples = load_step_samples(RECORDED)
    return samples, *fit_hardware(MODEL, samples, get_hardware("cpu"))


def test_fit_on_recorded_engine_steps(fitted) -> None:
    samples, hw, report = fitted
    assert report["steps"] == len(samples) == 78
    # recorded under load: single steps vary by 2x, the fit follows the typical one
    assert report["median_rel_error"] < 0.15
    # what the fit must get right for the simulator: prefill grows with tokens (a 256-token prompt
    # measured 2.35 s here), decode grows with the batch, one decoding row is the cheapest step
    prefill = [step_time(MODEL, hw, [SeqWork(0, n)]) for n in (32, 256, 1024)]
    assert prefill[0] < prefill[1] < prefill[2]
    assert prefill[1] == pytest.approx(2.35, rel=0.15)
    decode = [step_time(MODEL, hw, [SeqWork(128, 1)] * b) for b in (1, 2, 4, 8)]
    assert decode == sorted(decode) and decode[0] < 0.5 * prefill[1]
    # each measured shape within 40 % at its median (single steps swing more on a loaded machine)
    by_shape: dict[tuple[int, int], list[float]] = {}
    for s in samples:
        key = (len(s.work), sum(w.new_tokens for w in s.work))
        by_shape.setdefault(key, []).append(step_time(MODEL, hw, s.work) / s.seconds)
    medians = {k: sorted(v)[len(v) // 2] for k, v in by_shape.items()}
    assert all(0.6 < r < 1.4 for k, r in medians.items() if k != (8, 8)), medians


def test_step_samples_round_trip_and_bad_lines(tmp_path) -> None:
    samples = [StepSample((SeqWork(0, 32), SeqWork(40, 1, False)), 0.25)]
    path = tmp_path / "steps.jsonl"
    save_step_samples(samples, path)
    assert load_step_samples(path) == samples
    path.write_text(path.read_text() + '{"work": [[1, 2]], "seconds": 0.1}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not a step sample"):
        load_step_samples(path)


def test_calibrated_profile_loads_and_caps_the_batch(tmp_path, fitted) -> None:
    _, hw, _ = fitted
    cal = tmp_path / "cpu.json"
    save_hardware_file(hw, cal)
    # `cpu:MODEL` reads the calibration file; a hardware file path works the same
    for text, kwargs in (("cpu:smollm2-135m", {"calibration": cal}), (f"{cal}:smollm2-135m", {})):
        profile = parse_profile(text, **kwargs)
        assert profile.hardware == hw and profile.model.name == "smollm2-135m"
    wl = "synthetic:input=64,output=8"
    # a CPU fleet gets the real CPU engine's running-batch cap (8 per torch thread), a GPU fleet vLLM's
    cpu = build_settings(SimArgs(fleet=[f"{cal}:smollm2-135m=2"], workload=wl, rate=1, duration=1), None)
    gpu = build_settings(SimArgs(fleet=["h100:smollm2-135m=2"], workload=wl, rate=1, duration=1), None)
    given = build_settings(SimArgs(fleet=[f"{cal}:smollm2-135m=2"], workload=wl, rate=1, duration=1,
                                   max_num_seqs=3), None)
    assert (cpu.engine.seq_limit, gpu.engine.seq_limit, given.engine.seq_limit) == (8, 256, 3)


def test_simulated_cpu_fleet_queues_beyond_the_cap(tmp_path, fitted) -> None:
    _, hw, _ = fitted
    cal = tmp_path / "cpu.json"
    save_hardware_file(hw, cal)

    def run(*extra: str) -> tuple[int, list[str]]:
        out = tmp_path / f"run{len(extra)}"
        r = CliRunner().invoke(app, ["sim", "run", "--no-progress", "--no-plots", "--fleet", f"{cal}:smollm2-135m=1",
                                     "--workload", "synthetic:input=16,output=40", "--rate", "20", "--duration", "2",
                                     "--seed", "1", "--out", str(out), *extra])
        assert r.exit_code == 0, r.output
        res = json.loads((out / "results.json").read_text())
        return res["config"]["sim"]["max_num_seqs"], [x.get("error") or x["status"] for x in res["requests"]]

    (cap, capped), (wide, uncapped) = run(), run("--max-num-seqs", "64")
    assert (cap, wide) == (8, 64) and len(capped) == len(uncapped) > 30
    # ~40 requests within 2 s on a replica that decodes a step in ~0.2 s: with 64 running all start at
    # once and finish; with 8 the rest wait at the gateway, where flow control times them out
    assert set(uncapped) == {"ok"}
    assert 8 <= capped.count("ok") < len(capped) and set(capped) == {"ok", "queue_timeout"}


@pytest.mark.parametrize(("text", "line", "message"), [
    ('{\n  "name": "cpu",\n  "peak_flops": 1e9,\n  oops\n}\n', 4, "invalid JSON"),
    ('{\n  "name": "cpu",\n  "warp_drive": 1\n}\n', 3, "unknown hardware field 'warp_drive'"),
    ('{\n  "name": "cpu",\n  "mem_bandwidth": 5e9,\n  "mfu_decode": -1\n}\n', 4, "mfu_decode must be a number > 0"),
    ('{\n  "name": "tpu9"\n}\n', 1, "peak_flops"),
    ('[1, 2]\n', 1, "expected a JSON object"),
])
def test_bad_profile_files_name_file_and_line(tmp_path, text, line, message) -> None:
    path = tmp_path / "hw.json"
    path.write_text(text)
    with pytest.raises(HardwareFileError) as err:
        load_hardware_file(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and message in str(err.value)
    # and through the simulator's command line, without a traceback
    r = CliRunner().invoke(app, ["sim", "run", "--no-progress", "--fleet", f"{path}:smollm2-135m=1", "--workload",
                                 "synthetic", "--rate", "1", "--duration", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and f"{path}:{line}: " in r.output and "Traceback" not in r.output
