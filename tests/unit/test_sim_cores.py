"""Replicas sharing one host's cores (`--fleet ...@HOST`, `sim/cores.py`) and the co-location slowdown fitted
from the step logs of engines that served side by side (`sim.calibrate.side_by_side_samples`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path

import pytest

from inferstack.sim.calibrate import fit_hardware, side_by_side_samples
from inferstack.sim.cores import CoreShare
from inferstack.sim.fleet import apply_pd, parse_fleet
from inferstack.sim.hardware import get_hardware, load_hardware_file, save_hardware_file
from inferstack.sim.models import get_model
from inferstack.sim.perf_model import SeqWork, step_time
from inferstack.sim.runner import SimArgs, build_settings, simulate

MODEL = "smollm2-135m"


def test_a_step_slows_only_while_a_neighbour_steps():
    """c = 0.5: A alone for 0.5 s of its 1 s, then both at 1/1.5 speed until A ends at 1.25 (B's end, projected
    at that speed, is 2.0); B, begun at 0.5, has 0.5 s of work left then and runs it alone: ends at 1.75.
    Moved ends get new tokens."""
    share: CoreShare[str] = CoreShare()
    assert share.start("a", 1.0, 0.5, 0.0) == [("a", 1.0, 1)]
    moved = share.start("b", 1.0, 0.5, 0.5)
    assert [(r, pytest.approx(t), k) for r, t, k in moved] == [("a", 1.25, 2), ("b", 2.0, 3)]
    assert share.token("a") == 2 and share.token("b") == 3
    slowed, moved = share.end("a", 1.25)
    assert slowed == pytest.approx(0.25)
    assert [(r, pytest.approx(t), k) for r, t, k in moved] == [("b", 1.75, 4)]
    assert share.token("a") is None
    assert share.end("b", 1.75)[0] == pytest.approx(0.25)


def test_more_neighbours_slow_more_and_each_replica_has_its_own_slowdown():
    share: CoreShare[str] = CoreShare()
    share.start("a", 1.0, 0.2, 0.0)
    share.start("b", 1.0, 0.0, 0.0)
    moved = dict((r, t) for r, t, _ in share.start("c", 1.0, 0.2, 0.0))
    assert moved == {"a": pytest.approx(1.4), "c": pytest.approx(1.4)}      # two others: 1 + 0.2·2; b's c is 0
    assert share.token("b") == 3                     # b's end never moved since it began (a's did, twice)


def _trace(path: Path, rows: list[tuple[float, int, int]]) -> Path:
    path.write_text("".join(json.dumps({"timestamp": t, "input_tokens": i, "output_tokens": o}) + "\n"
                            for t, i, o in rows))
    return path


def _records(tmp: Path, fleet: str, trace: Path, name: str, leaps: bool = True) -> tuple[list[dict], object]:
    out = tmp / name
    out.mkdir()
    settings = build_settings(SimArgs(fleet=[fleet], workload=f"trace:path={trace}", rate=None, duration=0.0,
                                      routing="round-robin", seed=3), out)
    if not leaps:
        settings.decode_run_steps = 0
    sim, _ = simulate(settings)
    with (out / "requests.stream.csv").open() as f:
        return list(csv.DictReader(f)), [(r.counters(), r.stats.busy_s) for r in sim.replicas]


def _profile(tmp: Path, slowdown: float) -> str:
    path = tmp / f"cpu-{slowdown}.json"
    save_hardware_file(dataclasses.replace(get_hardware("cpu"), colocation_slowdown=slowdown), path)
    return f"{path}:{MODEL}"


def test_two_replicas_stepping_in_lockstep_each_take_one_plus_c_times_as_long(tmp_path):
    """Two equal requests at the same instant, one per replica: every step of each overlaps the other's
    whole step, so each request's latency is (1 + c) times what it is without a shared host."""
    trace = _trace(tmp_path / "t.jsonl", [(0.0, 200, 12), (0.0, 200, 12)])
    alone, _ = _records(tmp_path, f"{_profile(tmp_path, 0.3)}=2", trace, "alone")
    shared, _ = _records(tmp_path, f"{_profile(tmp_path, 0.3)}=2@box", trace, "shared")
    assert len(alone) == len(shared) == 2 and all(r["status"] == "ok" for r in alone + shared)
    for a, s in zip(alone, shared, strict=True):
        assert s["target"] == a["target"]
        for col in ("ttft_s", "tpot_s", "e2e_s"):
            assert float(s[col]) == pytest.approx(1.3 * float(a[col]), rel=1e-9)


def test_no_shared_host_or_no_slowdown_leaves_every_record_as_before(tmp_path):
    """Deterministic replay is unchanged: a fleet naming no host is the old code path; a host whose profile
    has c = 0, or a host with a single replica, gives the very same records (steps one event at a time there,
    which decode leaps match exactly)."""
    rng = random.Random(5)
    rows, t = [], 0.0
    for _ in range(30):
        t += rng.expovariate(8.0)
        rows.append((round(t, 6), rng.randint(40, 300), rng.randint(2, 40)))
    trace = _trace(tmp_path / "t.jsonl", rows)
    base = _records(tmp_path, f"{_profile(tmp_path, 0.0)}=3", trace, "base")
    assert len(base[0]) == 30
    assert _records(tmp_path, f"{_profile(tmp_path, 0.0)}=3@box", trace, "c0") == base
    one = _records(tmp_path, f"{_profile(tmp_path, 0.4)}=1", trace, "one")
    assert _records(tmp_path, f"{_profile(tmp_path, 0.4)}=1@box", trace, "one-shared") == one
    slowed = _records(tmp_path, f"{_profile(tmp_path, 0.4)}=3@box", trace, "slowed")[0]
    e2e = [(float(b["e2e_s"]), float(s["e2e_s"])) for b, s in zip(base[0], slowed, strict=True)]
    assert all(b <= s <= 1.4 * 2 * b for b, s in e2e) and sum(s for _, s in e2e) > 1.05 * sum(b for b, _ in e2e)


def test_fleet_names_its_host_and_pd_split_keeps_it():
    spec = parse_fleet(f"cpu:{MODEL}=2@box-1")
    assert (spec.replicas, spec.role, spec.host) == (2, "both", "box-1")
    assert parse_fleet(f"cpu:{MODEL}=2:decode").host is None
    assert [f.host for f in apply_pd([spec], "1p1d")] == ["box-1", "box-1"]


def _write_log(path: Path, steps: list[tuple[tuple[SeqWork, ...], float, float, bool]]) -> None:
    path.write_text("".join(json.dumps({"work": [[w.context, w.new_tokens, int(w.samples)] for w in work],
                                        "seconds": d, "start": start, "step_s": d, "busy": busy}) + "\n"
                            for work, start, d, busy in steps))


def _side_by_side_logs(tmp: Path, slowdown: float, seed: int) -> list[Path]:
    """Two engines stepping the catalog `cpu` model's prices under a known slowdown (`CoreShare`'s fluid
    model), each serving 16 bursts of 3-12 back-to-back steps of random shapes with idle gaps between them."""
    rng, model, hw = random.Random(seed), get_model(MODEL), get_hardware("cpu")
    shapes = [(SeqWork(0, n),) * b for n in (32, 96, 256) for b in (1, 2)] + \
        [(SeqWork(150, 1),) * b for b in range(1, 9)]
    bursts: list[list[list[tuple[SeqWork, ...]]]] = [[], []]
    next_start: dict[int, float] = {}
    for e in (0, 1):
        next_start[e] = rng.uniform(0.0, 0.3)
        bursts[e] = [[rng.choice(shapes) for _ in range(rng.randint(3, 12))] for _ in range(16)]
    gaps = {e: [rng.uniform(0.2, 1.5) for _ in range(16)] for e in (0, 1)}
    share: CoreShare[int] = CoreShare()
    ends: dict[int, float] = {}
    logs: list[list] = [[], []]
    pos = {0: (0, 0), 1: (0, 0)}          # engine -> (burst, step) of its next or current step
    while next_start or ends:
        t, is_start, e = min([(t, False, e) for e, t in ends.items()] + [(t, True, e) for e, t in next_start.items()])
        if is_start:
            del next_start[e]
            b, i = pos[e]
            logs[e].append([bursts[e][b][i], t, 0.0, True])
            moved = share.start(e, step_time(model, hw, list(bursts[e][b][i])), slowdown, t)
        else:
            del ends[e]
            _, moved = share.end(e, t)
            b, i = pos[e]
            logs[e][-1][2] = t - logs[e][-1][1]
            if i + 1 < len(bursts[e][b]):
                pos[e], next_start[e] = (b, i + 1), t
            else:
                logs[e][-1][3] = False
                if b + 1 < len(bursts[e]):
                    pos[e], next_start[e] = (b + 1, 0), t + gaps[e][b]
        ends.update((rep, end) for rep, end, _ in moved)
    paths = [tmp / f"engine{e}.jsonl" for e in (0, 1)]
    for e in (0, 1):
        _write_log(paths[e], [tuple(x) for x in logs[e]])
    return paths


@pytest.mark.parametrize("slowdown", [0.0, 0.4])
def test_calibration_recovers_a_known_colocation_slowdown(tmp_path, slowdown):
    """From the two engines' step logs alone (overlaps measured from their starts and durations), `engine
    calibrate --served-steps` gives back c and the step prices of the model that made them."""
    from typer.testing import CliRunner

    from inferstack.cli.main import app

    logs = _side_by_side_logs(tmp_path, slowdown, seed=11)
    samples = side_by_side_samples(logs, skip=0)
    assert 0.2 < sum(s.shared_s for s in samples) / sum(s.seconds for s in samples) < 0.9
    out = tmp_path / "cpu.json"
    result = CliRunner().invoke(app, ["engine", "calibrate", "--model", MODEL, "--out", str(out),
                                      *[x for log in logs for x in ("--served-steps", str(log))]])
    assert result.exit_code == 0, result.output
    assert f"co-location slowdown {slowdown:.1f}" in result.output
    hw = load_hardware_file(out)
    assert hw.colocation_slowdown == pytest.approx(slowdown, abs=0.02)
    model, cpu = get_model(MODEL), get_hardware("cpu")
    for work in [(SeqWork(0, 96),), (SeqWork(150, 1),), (SeqWork(150, 1),) * 4]:
        assert step_time(model, hw, list(work)) == pytest.approx(step_time(model, cpu, list(work)), rel=0.05)


def test_logs_that_never_overlap_fit_as_before(tmp_path):
    """Engines that did not step at the same time (or one engine) carry no shared seconds: c stays 0 and the
    fit is the one without the co-location term."""
    logs = _side_by_side_logs(tmp_path, 0.5, seed=4)
    model, cpu = get_model(MODEL), get_hardware("cpu")
    only = side_by_side_samples(logs[:1], skip=0)
    assert all(s.shared_s == 0.0 for s in only)
    flat = fit_hardware(model, [dataclasses.replace(s, shared_s=0.0) for s in only], cpu, mean_unbiased=True)
    assert fit_hardware(model, only, cpu, mean_unbiased=True) == flat
    assert flat[0].colocation_slowdown == 0.0


def test_a_crash_on_a_shared_host_loses_no_request_and_frees_the_cores(tmp_path):
    """The crashed replica's step in progress leaves the host (its neighbours speed up at once, no step is left
    on it at the end); every request ends once."""
    from inferstack.sim.simulation import Crash

    settings = build_settings(SimArgs(fleet=[f"{_profile(tmp_path, 0.5)}=3@box"], rate=3.0, duration=12.0, seed=2,
                                      workload="synthetic:input=uniform(50,300),output=uniform(2,40)"), None)
    settings.crashes = [Crash(1, 4.0, 2.0)]
    sim, res = simulate(settings)
    assert sim.arrived == sim.completed and not sim.active
    assert res.summary["requests"]["by_status"].get("connection", 0) >= 1
    share = sim._cores[sim.replicas[1]]
    assert all(share.token(r) is None for r in sim.replicas)
    assert sim.replicas[1].stats.lifetimes[0][1] == pytest.approx(4.0)
