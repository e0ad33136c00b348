"""Scheduler + KV manager + block pool, driven by a context-deterministic executor.

The executor's next token is a pure function of the sequence's tokens so far, which makes any
scheduling mistake (wrong positions, lost tokens, recompute errors) change the outputs.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from inferstack.engine.executor.base import ExecutorOutput
from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBuffer
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.engine.kv.manager import KVCacheManager
from inferstack.engine.outputs import FinishReason
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

SPACE = KVKeySpace("1" * 64, "float32")


def next_token(context: list[int]) -> int:
    h = 7
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % 997


class ContextExecutor:
    """Checks that each step computes exactly the tokens not yet computed, in order."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []

    def execute(self, batch: SchedulerOutput) -> ExecutorOutput:
        self.batches.append([(s.request_id, s.num_new_tokens) for s in batch.seqs])
        out = ExecutorOutput()
        for s in batch.seqs:
            assert s.start == s.request.num_computed_tokens
            if s.sample:
                out.sampled[s.request_id] = next_token(s.request.all_token_ids[: s.start + s.num_new_tokens])
        return out


def make(num_blocks: int = 64, budget: int = 64, max_seqs: int = 8, policy: str = "fcfs", events=None,
         caching: bool = True):
    pool = BlockPool(num_blocks, 16, caching, events)
    kv = KVCacheManager(pool, SPACE)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=4096,
                                     policy=policy), kv)


def req(rid: str, prompt: list[int], max_tokens: int = 8, priority: int = 0, **kw) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw),
                   time.monotonic(), priority=priority)


def run(s: Scheduler, ex: ContextExecutor, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not s.has_unfinished():
            return
        batch = s.schedule()
        s.update_from_output(batch, ex.execute(batch).sampled)
    raise AssertionError("scheduler did not finish")


def expected(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(next_token(toks))
    return toks[len(prompt):]


def test_chunked_prefill_and_mixed_batches():
    s, ex = make(budget=32), ContextExecutor()
    a, b = req("a", list(range(100)), 4), req("b", list(range(200, 210)), 4)
    s.add_request(a)
    s.add_request(b)
    run(s, ex)
    assert a.output_token_ids == expected(a.prompt_token_ids, 4)
    assert b.output_token_ids == expected(b.prompt_token_ids, 4)
    assert all(sum(n for _, n in step) <= 32 for step in ex.batches)
    assert ex.batches[0] == [("a", 32)]
    # once a's prompt is done, its decodes share steps with b's prefill
    assert any(len(step) == 2 for step in ex.batches)
    assert a.finish_reason is FinishReason.LENGTH


def test_max_num_seqs_caps_running():
    s = make(max_seqs=2, budget=512)
    for i in range(5):
        s.add_request(req(f"r{i}", [i] * 5, 3))
    s.schedule()
    assert s.num_running == 2 and s.num_waiting == 3


def test_prefix_cache_hit_skips_shared_blocks():
    s, ex = make(budget=1024), ContextExecutor()
    shared = list(range(1000, 1000 + 64))
    a = req("a", [*shared, 1, 2, 3], 2)
    s.add_request(a)
    run(s, ex)
    b = req("b", [*shared, 9, 9], 2)
    s.add_request(b)
    batch = s.schedule()
    assert b.num_cached_tokens == 64
    assert batch.seqs[0].start == 64 and batch.seqs[0].num_new_tokens == 2
    s.update_from_output(batch, ex.execute(batch).sampled)
    run(s, ex)
    assert b.output_token_ids == expected(b.prompt_token_ids, 2)
    assert s.counters.prefix_cache_hits == 64


def test_full_prompt_hit_still_computes_last_token():
    s, ex = make(budget=1024), ContextExecutor()
    prompt = list(range(32))
    s.add_request(req("a", prompt, 1))
    run(s, ex)
    b = req("b", prompt, 1)
    s.add_request(b)
    batch = s.schedule()
    assert b.num_cached_tokens == 16 and batch.seqs[0].num_new_tokens == 16


def test_cache_salt_separates_tenants():
    s, ex = make(budget=1024), ContextExecutor()
    prompt = list(range(40))
    a = Request("a", prompt, SamplingParams(max_tokens=1, temperature=0), time.monotonic(), cache_salt="t1")
    s.add_request(a)
    run(s, ex)
    b = Request("b", prompt, SamplingParams(max_tokens=1, temperature=0), time.monotonic(), cache_salt="t2")
    s.add_request(b)
    s.schedule()
    assert b.num_cached_tokens == 0


def _scarce_vs_ample(shapes: list[tuple[int, int]], num_blocks: int, policy: str) -> int | None:
    """Run the same requests with ``num_blocks`` and with ample blocks; assert equal outputs and a
    clean pool; return the scarce run's preemption count (None: a request exceeds the whole cache)."""
    reqs = [(f"r{i}", [(i * 13 + j) % 500 for j in range(p)], m, i % 3) for i, (p, m) in enumerate(shapes)]
    if any(-(-(len(prompt) + m) // 16) > num_blocks for _, prompt, m, _ in reqs):
        return None  # a single request bigger than the whole cache is rejected upstream
    outs, preemptions = {}, {}
    for blocks in (num_blocks, 4096):
        s, ex = make(num_blocks=blocks, budget=48, policy=policy), ContextExecutor()
        live = [req(rid, prompt, m, pr) for rid, prompt, m, pr in reqs]
        for r in live:
            s.add_request(r)
        run(s, ex)
        outs[blocks] = {r.request_id: r.output_token_ids for r in live}
        preemptions[blocks] = s.counters.num_preemptions
        assert s.kv.pool.num_free_blocks == blocks
    assert preemptions[4096] == 0
    assert outs[num_blocks] == outs[4096]
    return preemptions[num_blocks]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 90), st.integers(1, 20)), min_size=1, max_size=8),
       st.integers(8, 24), st.sampled_from(["fcfs", "priority"]))
def test_preemption_preserves_outputs(shapes, num_blocks, policy):
    """Scarce blocks may force preemption by recompute; outputs must equal the ample-blocks run."""
    preempted = _scarce_vs_ample(shapes, num_blocks, policy)
    event(f"preempted: {bool(preempted)}")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_scarce_blocks_do_preempt_and_outputs_still_match(policy):
    """The property above holds whether or not a draw preempts; this workload certainly does."""
    assert _scarce_vs_ample([(40, 20)] * 4, 10, policy) >= 1


def test_priority_policy_serves_lower_value_first():
    s = make(max_seqs=1, budget=512, policy="priority")
    s.add_request(req("low", [1] * 4, 1, priority=5))
    s.add_request(req("high", [2] * 4, 1, priority=-1))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["high"]


def test_abort_frees_blocks():
    s, ex = make(), ContextExecutor()
    r = req("a", list(range(50)), 100)
    s.add_request(r)
    batch = s.schedule()
    s.update_from_output(batch, ex.execute(batch).sampled)
    assert s.kv.pool.num_free_blocks < 64
    s.finish_request("a", FinishReason.ABORT)
    assert s.kv.pool.num_free_blocks == 64 and not s.has_unfinished()


def test_block_pool_lru_eviction_and_events():
    buf = EventBuffer()
    pool = BlockPool(4, 16, True, buf)
    kv = KVCacheManager(pool, SPACE)
    a = req("a", list(range(48)), 1)
    assert kv.allocate_slots(a, 48)
    stored = [e for e in buf.drain() if isinstance(e, BlockStored)]
    assert stored and stored[0].block_hashes == kv.update_block_hashes(a)[:3]
    assert stored[0].parent_block_hash is None and stored[0].token_ids == list(range(48))
    kv.free(a)
    assert pool.num_free_blocks == 4
    # 4 free blocks, 3 still cached: allocating 2 evicts the tail of `a` first (reverse free order)
    b = req("b", list(range(500, 532)), 1)
    assert kv.allocate_slots(b, 32)
    removed = [e for e in buf.drain() if isinstance(e, BlockRemoved)]
    assert removed and removed[0].block_hashes == [kv.update_block_hashes(a)[2]]
    kv.free(b)
    assert pool.reset_prefix_cache()
    assert isinstance(buf.drain()[-1], AllBlocksCleared)


def test_allocation_failure_changes_nothing():
    pool = BlockPool(2, 16)
    kv = KVCacheManager(pool, SPACE)
    r = req("a", list(range(40)), 1)
    assert not kv.allocate_slots(r, 40)
    assert pool.num_free_blocks == 2 and kv.block_ids("a") == []


def test_sampling_params_validation_names_param():
    from inferstack.engine.sampling_params import SamplingParamError

    with pytest.raises(SamplingParamError) as e:
        SamplingParams(top_p=0)
    assert e.value.param == "top_p"


CYCLE = [11, 12, 13, 14, 15]


def _state(s: Scheduler, events: EventBuffer) -> tuple:
    pool = s.kv.pool
    reqs = sorted((r.request_id, tuple(r.all_token_ids), r.num_computed_tokens, tuple(s.kv.block_ids(r.request_id)),
                   r.status) for r in s.requests.values())
    return (reqs, [r.request_id for r in s.running], pool.free_order(), pool.cached_blocks(),
            pool.num_created, vars(s.counters).copy(), [repr(e) for e in events.drain()] if events else [])


def _step_once(s: Scheduler) -> None:
    out = s.schedule()
    s.update_from_output(out, {q.request_id: CYCLE[q.request.num_output_tokens % len(CYCLE)]
                               for q in out.seqs if q.sample})


def _leap_and_steps(a: Scheduler, b: Scheduler, want: int) -> int:
    """``b`` leaps over the decode steps it may (at most ``want``), ``a`` takes them one at a time (one step each
    when no leap is possible); the steps leapt."""
    k = b.decode_run_limit(want)
    assert k == a.decode_run_limit(want)
    if k:
        b.advance_decodes(k, [[CYCLE[(r.num_output_tokens + j) % len(CYCLE)] for j in range(k)] for r in b.running])
    for _ in range(max(k, 1)):
        _step_once(a)
    if not k:
        _step_once(b)
    return k


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 60), st.integers(8, 70)), min_size=1, max_size=7),
       num_blocks=st.integers(12, 60), leaps=st.lists(st.integers(1, 40), min_size=8, max_size=30),
       with_events=st.booleans())
def test_decode_leap_equals_the_same_steps_one_at_a_time(shapes, num_blocks, leaps, with_events):
    """`advance_decodes` within `decode_run_limit` leaves block tables, the free queue's eviction order,
    the prefix-cache map, counters and KV events exactly as that many `schedule` + `update_from_output`.
    Without events the pool takes a leap's blocks at once where it can (`KVCacheManager._decode_slots_at_once`;
    equal prompts here give twin hashes, where it cannot)."""
    buffers = (EventBuffer(), EventBuffer()) if with_events else (None, None)
    a, b = make(num_blocks=num_blocks, events=buffers[0]), make(num_blocks=num_blocks, events=buffers[1])
    for i, (group, extra, out_len) in enumerate(shapes):
        prompt = [100 + group] * 20 + list(range(extra))      # shared 20-token heads per group
        for s in (a, b):
            s.add_request(req(str(i), prompt, max_tokens=out_len))
    leapt = 0
    for want in leaps:
        if not a.has_unfinished():
            break
        leapt += _leap_and_steps(a, b, want)
        assert _state(a, buffers[0]) == _state(b, buffers[1])
    event("leapt" if leapt else "no leap")


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(17, 60)), min_size=1, max_size=4),
       num_blocks=st.integers(10, 30), leaps=st.lists(st.integers(2, 40), min_size=30, max_size=60))
def test_decode_leap_equals_steps_when_a_replay_meets_its_evicted_twin(shapes, num_blocks, leaps):
    """The same requests twice, one wave after the other, on a small pool without events: the second wave's
    decode blocks hash as the first wave's, which sit freed (still cached) in the eviction queue, and a leap's
    own allocations evict them. The at-once path must step aside there (the point-by-point order decides which
    block keeps the hash), so the state equals that many single steps."""
    a, b = make(num_blocks=num_blocks), make(num_blocks=num_blocks)
    for w in range(2):
        for i, (extra, out_len) in enumerate(shapes):
            for s in (a, b):
                s.add_request(req(f"{w}-{i}", [7] * 3 + list(range(extra)), max_tokens=out_len))
        for want in leaps:
            if not a.has_unfinished():
                break
            _leap_and_steps(a, b, want)
            assert _state(a, None) == _state(b, None)


@pytest.mark.parametrize("caching", [True, False])
def test_a_plain_leap_takes_its_blocks_per_request(monkeypatch, caching):
    """Distinct prompts without events: every leap goes through `KVCacheManager.allocate_leap` (never the
    per-boundary fallback), crossing block boundaries at different steps per request, and leaves the state
    of the same steps one at a time."""
    a, b = make(num_blocks=64, caching=caching), make(num_blocks=64, caching=caching)
    for i, (extra, out_len) in enumerate([(5, 70), (16, 50), (30, 61)]):
        for s in (a, b):
            s.add_request(req(str(i), [200 + i] * 3 + list(range(extra)), max_tokens=out_len))

    def fallback(*_args):
        raise AssertionError("a plain leap fell back to the per-boundary path")

    monkeypatch.setattr(b, "_allocate_leap_points", fallback)
    leapt = 0
    for want in [3, 17, 40, 9, 33, 40, 40]:
        leapt += _leap_and_steps(a, b, want)
        assert _state(a, None) == _state(b, None)
    assert leapt > 60 and not a.has_unfinished()
