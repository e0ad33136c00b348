"""One scheduler, two executors: the emulated and the real (torch) executor see identical per-step
batches on the same workload, and the emulated clock follows the performance model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.support.models_tiny import write_tiny_model

from inferstack.engine.builder import build_engine
from inferstack.engine.config import EngineConfig
from inferstack.engine.core import EngineCore
from inferstack.engine.executor.emulated import EmulatedExecutor, emulated_kv_blocks
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.engine.request import Request, RequestStatus
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.scheduler import ScheduledSeq, SchedulerOutput
from inferstack.sim.perf_model import SeqWork, step_time
from inferstack.sim.profile import ProfileError, parse_profile

Step = list[tuple[str, int, int, bool]]


class Recorder:
    """Wraps an executor and keeps (request, start, tokens, sample) of every scheduled sequence."""

    def __init__(self, inner) -> None:
        self.inner, self.steps = inner, []
        self.num_kv_blocks, self.block_size = inner.num_kv_blocks, inner.block_size

    def execute(self, batch: SchedulerOutput):
        self.steps.append([(s.request_id, s.start, s.num_new_tokens, s.sample) for s in batch.seqs])
        return self.inner.execute(batch)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)


def drive(core: EngineCore) -> None:
    """A fixed workload: shared prefixes, a prompt longer than the step budget, arrivals mid-run,
    and a KV cache small enough to preempt."""
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (12, 5, 20, 9, 15, 7)]
    shared = list(range(3, 3 + 48))
    prompts = [[*shared, 60, 61, 62], [*shared, 70, 71], list(range(100, 190)), shared + [80] * 20,
               list(range(200, 230)), [*shared, 60, 61, 62, 63]]

    def add(i: int) -> None:
        core.add_request(Request(f"r{i}", prompts[i], params[i], arrival_time=float(i)))

    for i in range(3):
        add(i)
    step = 0
    while core.has_unfinished() or step < 8:
        if step == 4:
            add(3)
            add(4)
        if step == 7:
            add(5)
        core.step()
        step += 1
        assert step < 500


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_real_and_emulated_executors_form_identical_batches(tiny: Path) -> None:
    config = EngineConfig(model=str(tiny), device="cpu", dtype="float32", num_kv_blocks=14, max_num_seqs=4,
                          max_num_batched_tokens=40)
    real = build_engine(config)
    real_rec = Recorder(real.core.executor)
    real.core.executor = real_rec
    drive(real.core)

    profile = parse_profile(f"cpu:{tiny / 'config.json'}")
    emu = EmulatedExecutor(profile, emulated_kv_blocks(profile, config), config.block_size,
                           output_token_ids=[5, 6, 7], realtime=False)
    emu_rec = Recorder(emu)
    key_space = KVKeySpace(model_digest="0" * 64, dtype="float32", block_size=config.block_size)
    core = EngineCore.build(config, emu_rec, real.tokenizer, key_space, real.max_model_len)
    drive(core)

    assert len(real_rec.steps) > 20
    assert emu_rec.steps == real_rec.steps
    # the workload exercised chunked prefill, mixed batches, prefix hits and preemption
    assert any(n > 1 for step in real_rec.steps for _, _, n, _ in step)
    assert any(len({n > 1 for _, _, n, _ in step}) == 2 for step in real_rec.steps)
    real_stats, emu_stats = real.core.stats(), core.stats()
    assert real_stats.prefix_cache_hits == emu_stats.prefix_cache_hits > 0
    assert real_stats.num_preemptions == emu_stats.num_preemptions > 0
    assert emu.stats.steps == len(emu_rec.steps)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.slept.append(dt)
        self.t += dt


def _batch(works: list[tuple[int, int]]) -> SchedulerOutput:
    seqs = []
    for i, (start, n) in enumerate(works):
        req = Request(f"q{i}", list(range(start + n)), SamplingParams(max_tokens=4), arrival_time=0.0)
        seqs.append(ScheduledSeq(request=req, start=start, num_new_tokens=n, block_ids=[], sample=True))
    return SchedulerOutput(seqs=seqs)


def test_emulated_clock_follows_the_performance_model() -> None:
    profile = parse_profile("h100:llama-3-8b")
    clock = FakeClock()
    ex = EmulatedExecutor(profile, 1000, 16, [11, 12], clock=clock.now, sleep=clock.sleep)
    decode = _batch([(500, 1)] * 8)
    expected = step_time(profile.model, profile.hardware, [SeqWork(500, 1)] * 8)
    out = ex.execute(decode)
    assert clock.slept == [pytest.approx(expected)]
    assert set(out.sampled) == {f"q{i}" for i in range(8)} and set(out.sampled.values()) == {11}
    # the host spent 1 ms on scheduling: it overlaps the next step, which still ends one step later
    clock.t += 0.001
    ex.execute(decode)
    assert clock.slept[-1] == pytest.approx(expected - 0.001)
    assert clock.t == pytest.approx(100.0 + 2 * expected)
    # once every request of the last step finished, the engine was idle: the next step starts at "now"
    for s in decode.seqs:
        s.request.status = RequestStatus.FINISHED
    clock.t += 5.0
    ex.execute(_batch([(500, 1)] * 8))
    assert clock.slept[-1] == pytest.approx(expected)
    assert ex.stats.late_steps == 0
    # a host slower than the device: the step ends late, the lag is recorded and not carried over
    clock.t += expected + 0.004
    ex.execute(decode_busy := _batch([(500, 1)] * 8))
    assert ex.stats.late_steps == 1 and ex.stats.max_lag_s == pytest.approx(0.004)
    clock.t += 0.001
    ex.execute(decode_busy)
    assert clock.slept[-1] == pytest.approx(expected - 0.001)
    assert ex.stats.summary()["steps"] == 5


def test_kv_blocks_follow_the_hardware_memory() -> None:
    config = EngineConfig(model="x")
    blocks = emulated_kv_blocks(parse_profile("h100:llama-3-8b"), config)
    assert blocks * 16 == pytest.approx((80e9 * 0.9 - 16.06e9) / 131072, rel=0.01)
    assert emulated_kv_blocks(parse_profile("h200:llama-3-8b"), config) > blocks
    assert emulated_kv_blocks(parse_profile("h100:llama-3-8b"), EngineConfig(model="x", num_kv_blocks=7)) == 7


@pytest.mark.parametrize("text,match", [("h100", "HARDWARE:MODEL"), ("tpu:llama-3-8b", "unknown hardware"),
                                        ("h100:gpt-9", "unknown model"), (":x", "HARDWARE:MODEL")])
def test_bad_profiles(text: str, match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        parse_profile(text)


def test_tensor_parallel_profile() -> None:
    p = parse_profile("h100x4:llama-3-70b")
    assert p.tp == 4 and p.model.num_layers == 80
