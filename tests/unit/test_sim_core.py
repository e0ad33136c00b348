"""`inferstack sim`: seeded runs repeat bit for bit, the simulated engine schedules exactly as the
emulated EngineCore does, and no request, token or KV block is lost or invented (hypothesis)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from inferstack.config.schema import InferstackConfig
from inferstack.engine.config import EngineConfig
from inferstack.engine.executor.emulated import build_emulated_engine
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams
from inferstack.gateway.requests import engine_priority
from inferstack.gateway.routing import PRESETS
from inferstack.sim.autoscale import QueueTarget
from inferstack.sim.profile import parse_profile
from inferstack.sim.runner import SimArgs, build_settings, simulate
from inferstack.sim.simulation import POOL, Simulation

FLEET = "h100:llama-3-8b"


def _args(**kw) -> SimArgs:
    base = {"fleet": [f"{FLEET}=3"], "workload": "synthetic:input=uniform(50,300),output=uniform(2,30)",
            "rate": 30.0, "duration": 3.0, "seed": 1}
    return SimArgs(**{**base, **kw})


def _run(tmp: Path | None, engine: dict | None = None, **kw) -> Simulation:
    settings = build_settings(_args(**kw), tmp)
    if engine:
        settings.engine = dataclasses.replace(settings.engine, **engine)
    sim, _ = simulate(settings)
    return sim


def test_same_seed_gives_identical_records_and_another_seed_does_not(tmp_path):
    runs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        out.mkdir()
        sim = _run(out, seed=seed, routing="default")
        runs.append(((out / "requests.stream.csv").read_bytes(), sim.now, dict(sim.gateway.decisions)))
    assert runs[0][0].count(b"\n") > 60          # ~90 requests, all with records
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


def _trace(path: Path) -> Path:
    """Shared prefixes (two groups), arrivals close enough to queue, one prompt over the step budget."""
    rows = []
    t = 0.0
    for i in range(24):
        t += 0.004 + (i % 5) * 0.003
        rows.append({"timestamp": round(t, 6), "input_tokens": 1500 if i == 7 else 120 + 40 * (i % 3),
                     "output_tokens": 4 + (i * 7) % 17, "prefix_id": f"g{i % 2}", "prefix_tokens": 96})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_simulated_replica_schedules_exactly_like_the_emulated_engine_core(tmp_path, monkeypatch):
    trace = _trace(tmp_path / "trace.jsonl")
    settings = build_settings(_args(fleet=[f"{FLEET}=1"], workload=f"trace:path={trace}", rate=None,
                                    duration=0.0, tokenizer="bundled"), None)
    settings.engine = dataclasses.replace(settings.engine, max_num_batched_tokens=512, num_kv_blocks=120)
    # the engine alone: no gateway queue in front of it (flow control holds requests while saturated)
    settings.config = InferstackConfig.model_validate({"gateway": {"flow_control": {"enabled": False}}})
    settings.decode_run_steps = 0     # one event per step, to record each batch (leaps: the test below)
    sim = Simulation(settings)
    sim_steps: list[tuple[float, list]] = []
    rep = sim.replicas[0]
    begin = rep.begin_step

    def recording_begin():
        dt = begin()
        if dt is not None:
            sim_steps.append((sim.now, [(s.request_id, s.start, s.num_new_tokens) for s in rep.batch.seqs]))
        return dt

    monkeypatch.setattr(rep, "begin_step", recording_begin)
    sim.run()
    assert sim.completed == 24 and all(sim.sink.ok)

    # The same requests into the emulated EngineCore (`engine serve --emulate`), whose steps run back
    # to back on a virtual clock: EngineCore.step schedules, executes and updates as live.
    clock = [0.0]
    built = build_emulated_engine(dataclasses.replace(settings.engine), parse_profile(FLEET), realtime=False)
    core = built.core
    core.scheduler.clock = lambda: clock[0]
    core_steps: list[tuple[float, list]] = []
    inner = core.executor

    class Recorder:
        num_kv_blocks, block_size = inner.num_kv_blocks, inner.block_size

        def execute(self, batch):
            core_steps.append((clock[0], [(s.request_id, s.start, s.num_new_tokens) for s in batch.seqs]))
            clock[0] += inner.step_time(batch)
            return inner.execute(batch)

        def release(self, request_id):
            inner.release(request_id)

    core.executor = Recorder()
    specs = [(u.at, u.stages[0][0]) for u in settings.run.workload.units(settings.run.seed)]
    pending = [Request(str(i), settings.tokens.encode(spec.messages),
                       SamplingParams(max_tokens=spec.output_tokens, ignore_eos=True), arrival_time=at,
                       priority=engine_priority(0), cache_salt=sim.gateway.salt)
               for i, (at, spec) in enumerate(specs)]
    while pending or core.has_unfinished():
        if not core.has_unfinished():
            clock[0] = max(clock[0], pending[0].arrival_time)
        while pending and pending[0].arrival_time <= clock[0]:
            core.add_request(pending.pop(0))
        assert core.step() or core.has_unfinished() or not pending
    assert len(core_steps) > 30
    assert [s for _, s in sim_steps] == [s for _, s in core_steps]
    assert [t for t, _ in sim_steps] == pytest.approx([t for t, _ in core_steps], abs=1e-12)
    counters = core.scheduler.counters
    assert counters.num_preemptions > 0 and counters.prefix_cache_hits > 0
    assert rep.counters() == {"prefix_cache_queries": counters.prefix_cache_queries,
                              "prefix_cache_hits": counters.prefix_cache_hits,
                              "num_preemptions": counters.num_preemptions,
                              "generation_tokens": counters.generation_tokens, "steps": len(core_steps)}


_LEAP_CASES = {
    "default routing, scrapes mid-leap": {"routing": "default"},
    "preemptions": {"engine": {"num_kv_blocks": 200}, "rate": 60.0},
    "crashes mid-leap": {"crash": ["0@1.2+0.5", "1@2.0"]},
    "drain timeout ends leaps": {"drain_timeout": 0.3},
    "request overhead": {"request_overhead_ms": 5.0, "routing": "least-load"},
    "autoscaler samples": {"fleet": [f"{FLEET}=1"], "rate": 40.0, "duration": 4.0, "engine": {"max_num_seqs": 8},
                           "autoscaler": True},
}


@pytest.mark.parametrize("case", sorted(_LEAP_CASES))
def test_decode_leaps_give_the_same_records_as_one_event_per_step(case, tmp_path):
    """Leaping over identical decode steps is exact: records, final time, engine counters, busy time."""
    kw = dict(_LEAP_CASES[case])
    engine, scaled = kw.pop("engine", None), kw.pop("autoscaler", False)
    runs = []
    for leap in (0, 64):
        out = tmp_path / str(leap)
        out.mkdir()
        settings = build_settings(_args(workload="synthetic:input=uniform(50,300),output=uniform(2,120)", **kw), out)
        if engine:
            settings.engine = dataclasses.replace(settings.engine, **engine)
        if scaled:
            settings.autoscaler = QueueTarget(target=8, interval_s=1.0, window_samples=2, cold_start_s=2.0,
                                              max_replicas=6)
        settings.decode_run_steps = leap
        sim, _ = simulate(settings)
        runs.append(((out / "requests.stream.csv").read_text(), sim.now,
                     [(r.counters(), r.stats.busy_s, r.stats.lifetimes) for r in sim.replicas], sim.events))
    (per_step, *same), (leapt, *same_leapt) = runs[0], runs[1]
    assert per_step.count("\n") > 80
    assert leapt == per_step
    assert same_leapt[:2] == same[:2]
    assert same_leapt[2] < same[2]          # and it did leap: fewer events


def test_decode_step_times_price_each_step_as_step_time():
    from inferstack.sim.perf_model import SeqWork, decode_step_times, step_cost, step_time

    for fleet in ("h100:llama-3-8b", "h100x4:llama-3-70b", "cpu:llama-3-8b"):
        p = parse_profile(fleet)
        for contexts in ([5], [17, 900, 3, 4096], list(range(1, 300, 7)), [4000] * 256):
            got = decode_step_times(p.model, p.hardware, contexts, 9, p.tp)
            assert got == [step_time(p.model, p.hardware, [SeqWork(c + j, 1, True) for c in contexts], p.tp)
                           for j in range(9)]
    # batches at the ridge whose steps go from compute- to memory-bound within the leap (memory grows faster
    # with the context): the memory-bound shortcut must not apply, and the mixed result is still exact
    for fleet, contexts, steps in (("cpu:llama-3-8b", [490] * 11, 64), ("h100:llama-3-8b", [0] * 199, 16)):
        p = parse_profile(fleet)
        want = [step_time(p.model, p.hardware, [SeqWork(c + j, 1, True) for c in contexts], p.tp)
                for j in range(steps)]
        costs = [step_cost(p.model, p.hardware, [SeqWork(c + j, 1, True) for c in contexts], p.tp)
                 for j in (0, steps - 1)]
        assert costs[0].compute_s > costs[0].memory_s and costs[1].compute_s < costs[1].memory_s
        assert decode_step_times(p.model, p.hardware, contexts, steps, p.tp) == want


@settings(max_examples=60, deadline=None)
@given(fleet=st.sampled_from(["h100:llama-3-8b", "h100x4:llama-3-70b", "cpu:llama-3-8b", "l4:llama-3-8b"]),
       contexts=st.lists(st.integers(0, 8000), min_size=1, max_size=80), steps=st.integers(1, 64))
def test_decode_step_times_memory_bound_shortcut_is_exact(fleet, contexts, steps):
    """Leaps that are memory-bound throughout skip the FLOP matrix; compute-bound ones (the cpu profile at
    a large batch) and those that cross the ridge mid-run take it: every step time is `step_time`'s."""
    from inferstack.sim.perf_model import SeqWork, decode_step_times, step_time

    p = parse_profile(fleet)
    got = decode_step_times(p.model, p.hardware, contexts, steps, p.tp)
    assert got == [step_time(p.model, p.hardware, [SeqWork(c + j, 1, True) for c in contexts], p.tp)
                   for j in range(steps)]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routing=st.sampled_from(sorted(PRESETS)), replicas=st.integers(1, 4), blocks=st.integers(40, 400),
       rate=st.floats(5, 80), seed=st.integers(0, 2**16), pd=st.booleans(), crash=st.booleans())
# a crash's retry that found no healthy endpoint released the crashed endpoint's in-flight slot twice (-1)
@example(routing="cache-aware", replicas=1, blocks=40, rate=17.0, seed=1037, pd=True, crash=True)
def test_no_request_or_token_is_lost_and_kv_never_overflows(routing, replicas, blocks, rate, seed, pd, crash):
    kw = {"fleet": [f"{FLEET}={replicas + 1}"], "pd": f"1p{replicas}d" if pd else "colocated"}
    settings = build_settings(_args(routing=routing, rate=rate, seed=seed, duration=1.0,
                                    workload="shared-prefix:groups=3,users=4,system=200,question=uniform(10,80),"
                                             "output=uniform(1,24)",
                                    crash=["0@0.4+0.3"] if crash else [], **kw), None)
    settings.engine = dataclasses.replace(settings.engine, num_kv_blocks=blocks, max_num_batched_tokens=256)
    sim = Simulation(settings)
    for rep in sim.replicas:
        step = rep.begin_step

        def checked(rep=rep, step=step):
            dt = step()
            pool = rep.scheduler.kv.pool
            assert pool.num_created <= pool.num_blocks and 0 <= pool.num_free_blocks <= pool.num_blocks
            held = Counter(b for r in rep.scheduler.requests for b in rep.scheduler.kv.block_ids(r))
            assert len(held) + pool.num_free_blocks <= pool.num_blocks      # a block is free or held, never both
            assert all(pool.ref_cnt[b] >= n for b, n in held.items())
            return dt

        rep.begin_step = checked
    sim.run()
    sink = sim.sink
    assert sink.count == sim.arrived                      # one record per request: none lost or doubled
    assert not sim.active and sim.gateway.admission.queued == 0
    assert all(ep.view.in_flight == 0 for ep in sim.gateway.order)
    ok = [bool(x) for x in sink.ok]
    asked = [int(x) for x in sink.cols["output"]]
    statuses = set(sink.status)
    assert statuses <= {"ok", "connection", "http_400", "http_429", "http_503"}
    if not crash:
        assert all(ok), sink.status
    # token conservation: an ok request got exactly its output tokens, and the engines produced every
    # token the clients received (plus one per prefill leg, and tokens of requests lost in a crash)
    produced = sum(rep.counters()["generation_tokens"] for rep in sim.replicas)
    received = sum(a for a, k in zip(asked, ok, strict=True) if k)
    assert produced >= received
    if not crash and not pd:
        assert produced == received


def test_autoscaler_hook_adds_replicas_after_the_cold_start():
    settings = build_settings(_args(fleet=[f"{FLEET}=1"], rate=60.0, duration=5.0,
                                    workload="synthetic:input=400,output=60"), None)
    settings.engine = dataclasses.replace(settings.engine, max_num_seqs=8)     # one replica is too few
    settings.autoscaler = QueueTarget(target=8, interval_s=1.0, window_samples=2, cold_start_s=2.0, max_replicas=6)
    sim = Simulation(settings)
    sim.run()
    joined = [r for r in sim.replicas[1:]]
    assert len(joined) >= 2
    assert min(r.stats.lifetimes[0][0] for r in joined) >= 3.0 - 1e-9   # first decision at 1 s + 2 s cold start
    assert all(r.stats.steps > 0 for r in joined)
    assert sim.completed == sim.arrived


def test_engine_config_default_matches_the_simulated_one():
    """The simulator runs replicas with EngineConfig's own scheduler defaults (as `engine serve`)."""
    settings = build_settings(_args(), None)
    ref = EngineConfig(model=settings.engine.model)
    assert (settings.engine.max_num_seqs, settings.engine.max_num_batched_tokens, settings.engine.block_size) == \
        (ref.seq_limit, ref.max_num_batched_tokens, ref.block_size)


def test_autoscaling_policies_run_in_the_simulator_on_real_samples():
    """The autoscaling package's policies behind the hook, fed by the simulation's samples."""
    from inferstack.autoscale.decision import Bounds
    from inferstack.autoscale.driver import PolicyAutoscaler
    from inferstack.autoscale.kpa import KPA

    settings = build_settings(_args(fleet=[f"{FLEET}=1"], rate=60.0, duration=5.0,
                                    workload="synthetic:input=400,output=60"), None)
    settings.engine = dataclasses.replace(settings.engine, max_num_seqs=8)
    scaler = PolicyAutoscaler(KPA(target=8, stable_window_s=2.0, panic_window_s=1.0), Bounds(1, 6),
                              interval_s=1.0, window_samples=4, cold_start_s=1.0)
    settings.autoscaler = scaler
    sim = Simulation(settings)
    sim.run()
    assert sim.completed == sim.arrived
    assert len(sim.replicas) > 1 and max(d.desired for _, _, d in scaler.decisions) <= 6
    samples = [d for _, _, d in scaler.decisions]
    assert samples[0].current == 1 and any(d.direction == "up" for d in samples)


def test_samples_carry_the_replicas_duty_cycle():
    """`busy` (the GPU-utilisation signal) is the fraction of each interval the replicas ran a step:
    near 1 for a saturated replica, lower when it idles between light arrivals."""
    from inferstack.autoscale.decision import Bounds
    from inferstack.autoscale.driver import PolicyAutoscaler
    from inferstack.autoscale.hpa import HPA

    busy = {}
    for rate in (60.0, 1.0):
        settings = build_settings(_args(fleet=[f"{FLEET}=1"], rate=rate, duration=4.0,
                                        workload="synthetic:input=400,output=60"), None)
        settings.engine = dataclasses.replace(settings.engine, max_num_seqs=8)
        settings.autoscaler = PolicyAutoscaler(HPA(metric="gpu_util", target=2.0), Bounds(1, 1), interval_s=1.0,
                                               window_samples=4, cold_start_s=1.0)
        sim = Simulation(settings)
        sim.run()
        values = [s.pools[POOL].busy for s in sim._samples]
        assert all(v is None or 0.0 <= v <= 1.0 for v in values)
        busy[rate] = max(v for v in values if v is not None)
    assert busy[60.0] >= 0.9 and busy[1.0] < busy[60.0]


def test_calibrated_overhead_samples_are_drawn_per_request_and_repeat_with_the_seed(tmp_path):
    ttfts = []
    for name, samples in (("none", ()), ("a", (10.0, 20.0, 30.0)), ("b", (10.0, 20.0, 30.0))):
        out = tmp_path / name
        out.mkdir()
        settings = build_settings(_args(fleet=[f"{FLEET}=2"], rate=5.0, request_overhead_samples_ms=samples), out)
        sim, _ = simulate(settings)
        ttfts.append([float(x) for x in sim.sink.cols["ttft"]])
    base, a, b = ttfts
    assert a == b                                    # seeded draws: the run repeats bit for bit
    added = sorted(round((x - y) * 1e3) for x, y in zip(a, base, strict=True))
    # light load: TTFT moves by the draw (a few requests also batch differently with their neighbours)
    drawn = [x for x in added if x in (10, 20, 30)]
    assert len(drawn) >= 0.8 * len(added) and set(drawn) == {10, 20, 30}


def test_flow_controls_free_slots_kept_incrementally_equal_the_pools_sum():
    """The simulator keeps the pool's room current as in-flight counts move; flow control must see what
    summing every endpoint's positive room (the live gateway's `Pool.free_slots`) gives, at every ask."""
    settings = build_settings(_args(fleet=[f"{FLEET}=3"], rate=120.0, duration=2.0, crash=["1@0.8+0.4"],
                                    workload="synthetic:input=uniform(50,600),output=uniform(20,200)"), None)
    settings.engine = dataclasses.replace(settings.engine, max_num_seqs=4)     # saturate: requests queue
    sim = Simulation(settings)
    gw, asked = sim.gateway, []
    kept = gw.free_slots

    def checked() -> int:
        got = kept()
        assert got == gw.snapshot().free_slots(positive=True)
        asked.append(got)
        return got

    gw.admission.free_slots = checked
    sim.run()
    assert len(asked) > 200 and 0 in asked and max(asked) > 0     # it was asked often, full and not
    assert sim.completed == sim.arrived


def test_requests_routed_to_a_full_endpoint_wait_for_it_and_the_run_repeats(tmp_path):
    """The simulator mirrors the live per-endpoint hold (`gateway.endpointflow`): under saturation with prefix
    affinity some requests wait in their endpoint's hold queue, every one of them ends (served here), nothing
    stays held, and a seeded run repeats bit for bit."""
    def run(out) -> tuple[bytes, int]:
        out.mkdir()
        settings = build_settings(_args(fleet=[f"{FLEET}=3"], rate=120.0, duration=2.0, crash=["1@0.8+0.4"],
                                        workload="shared-prefix:groups=2,users=3,system=400,question=uniform(10,60),"
                                                 "output=uniform(20,120)"), out)
        settings.engine = dataclasses.replace(settings.engine, max_num_seqs=4)
        sim = Simulation(settings)
        held = [0]
        shift = sim.gateway.shift_held

        def counted(ep, delta: int) -> None:
            held[0] += delta > 0
            shift(ep, delta)

        sim.gateway.shift_held = counted
        sim.run()
        assert sim.completed == sim.arrived
        assert all(q.queued == 0 for q in sim.gateway.holds.values())
        assert all(ep.view.held == 0 for ep in sim.gateway.order)
        return (out / "requests.stream.csv").read_bytes(), held[0]

    first, held = run(tmp_path / "a")
    assert held > 10
    assert run(tmp_path / "b") == (first, held)


_LEAP_WORKLOADS = (
    "synthetic:input=uniform(20,400),output=uniform(1,90)",
    "shared-prefix:groups=2,users=3,system=120,question=uniform(10,60),output=uniform(1,70)",
    "multi-turn:turns=3,input=40,output=uniform(1,40),think=0.05",
    "agentic:fanout=3,context=200,input=30,output=uniform(2,50)",
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=st.sampled_from(_LEAP_WORKLOADS), routing=st.sampled_from(sorted(PRESETS)),
       fleet=st.sampled_from((FLEET, "l4:llama-3-8b")), rate=st.floats(10, 60), seed=st.integers(0, 2**16),
       blocks=st.sampled_from((None, 120)), max_steps=st.sampled_from((2, 7, 64)))
def test_leaps_ending_in_finishes_and_cut_by_arrivals_keep_every_record(workload, routing, fleet, rate, seed,
                                                                        blocks, max_steps, tmp_path_factory):
    """Leaps that end with the step finishing requests, and leaps cut by an arrival (the step in progress
    applied with the leap, its tokens delivered at its end), write the records of one event per step, for
    every workload shape, routing preset and two hardware profiles, with and without KV pressure."""
    outputs = []
    for leap in (0, max_steps):
        out = tmp_path_factory.mktemp("leap")
        s = build_settings(_args(fleet=[f"{fleet}=2"], workload=workload, routing=routing, rate=rate, seed=seed,
                                 duration=1.5), out)
        if blocks:
            s.engine = dataclasses.replace(s.engine, num_kv_blocks=blocks)
        s.decode_run_steps = leap
        sim, _ = simulate(s)
        outputs.append(((out / "requests.stream.csv").read_bytes(), sim.now,
                        [(r.counters(), r.stats.busy_s) for r in sim.replicas]))
    assert outputs[0][0].count(b"\n") > 5
    assert outputs[1] == outputs[0]


@dataclasses.dataclass
class _Scripted:
    """An autoscaler that answers a fixed list of replica counts, then holds."""

    answers: list[int]
    interval_s: float = 1.0
    window_samples: int = 2
    cold_start_s: float = 2.0

    def desired(self, window, replicas):
        return {POOL: self.answers.pop(0) if self.answers else replicas[POOL]}


def test_a_scale_down_cancels_replicas_still_starting_before_draining_ready_ones():
    """1 ready replica, 3 ordered at 1 s, then 2 wanted at 2 s (all 3 still in their cold start): two orders are
    cancelled and the ready replica keeps serving, as the local actuator does. (The simulator used to drain the
    ready replica and keep the orders: no replica served until the orders joined.)"""
    settings = build_settings(_args(fleet=[f"{FLEET}=1"], rate=20.0, duration=5.0,
                                    workload="synthetic:input=200,output=40"), None)
    settings.autoscaler = _Scripted([4, 2])
    sim = Simulation(settings)
    sim.run()
    assert len(sim.replicas) == 2                        # the first one and the one order left
    assert sim.replicas[1].stats.lifetimes[0][0] >= 3.0 - 1e-9     # ordered at 1 s, 2 s cold start
    assert sim.replicas[0].id in sim.gateway.endpoints and not sim.gateway.endpoints[sim.replicas[0].id].draining
    assert sim.starting == 0 and sim.completed == sim.arrived and set(sim.sink.status) == {"ok"}
