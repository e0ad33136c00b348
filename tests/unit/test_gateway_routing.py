"""Routing policy on snapshots: scorers, pickers, presets, prefix indexes (pure, no network)."""

from __future__ import annotations

import random
from collections import Counter, OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.engine.kv.events import BlockRemoved, BlockStored, decode_batch, encode_batch
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.gateway.kvevents import apply_batch
from inferstack.gateway.routing import EndpointView, PoolSnapshot, RequestView, RoutingState, build_router
from inferstack.gateway.routing.prefix import ApproxPrefixIndex, PreciseIndex, PrefixHasher, text_prefix_hashes
from inferstack.gateway.routing.profiles import _deciding_scorer
from inferstack.gateway.routing.registry import PRESETS, make_profile
from inferstack.gateway.routing.roots import ReusedRoots
from inferstack.gateway.routing.scorers import SCORERS, UNIFORM
from inferstack.gateway.routing.state import RouteContext


def req(text: str, model: str = "m", salt: str = "t") -> RequestView:
    return RequestView(model=model, prefix_hashes=text_prefix_hashes([text], model + salt, 64, 256),
                       prompt_chars=len(text))


def fleet(n: int, **kw) -> list[EndpointView]:
    return [EndpointView(f"e{i}", has_metrics=True, metrics_age_s=0.01, **kw) for i in range(n)]


endpoint_st = st.builds(
    EndpointView,
    id=st.sampled_from(["a", "b", "c", "d", "e"]),
    queue=st.floats(0, 500), running=st.floats(0, 500), kv_usage=st.floats(0, 1.5),
    metrics_age_s=st.floats(0, 10), has_metrics=st.booleans(), in_flight=st.integers(0, 1000),
    healthy=st.booleans(), max_concurrency=st.one_of(st.none(), st.integers(1, 64)),
    adapters_active=st.frozensets(st.sampled_from(["l1", "l2"])), max_lora=st.integers(0, 4),
)


@settings(max_examples=150, deadline=None)
@given(eps=st.lists(endpoint_st, min_size=1, max_size=6, unique_by=lambda e: e.id),
       text=st.text(max_size=400), adapter=st.sampled_from([None, "l1", "l3"]), session=st.sampled_from([None, "s"]))
def test_every_scorer_in_unit_interval_and_every_preset_picks_a_candidate(eps, text, adapter, session):
    state = RoutingState()
    r = req(text)
    r.adapter, r.session = adapter, session
    state.record(r, eps[0].id, cold=True)
    snap = PoolSnapshot(eps)
    ctx = RouteContext(r, snap, state)
    for name, scorer in SCORERS.items():
        scores = scorer(ctx, list(eps))
        assert len(scores) == len(eps)
        assert all(0.0 <= s <= 1.0 for s in scores), (name, scores)
    for preset in PRESETS:
        res = build_router(preset, state).route(r, snap)
        if any(e.healthy for e in eps):
            assert res is not None and res.endpoint.healthy, preset
        else:
            assert res is None, preset


def test_default_spreads_distinct_prefixes_on_an_idle_fleet():
    router = build_router("default")
    snap = PoolSnapshot(fleet(4))
    picks = [router.route(req(f"distinct prompt {i} " * 30), snap).endpoint.id for i in range(40)]
    assert Counter(picks) == {"e0": 10, "e1": 10, "e2": 10, "e3": 10}


def test_cache_aware_piles_idle_requests_onto_one_endpoint():
    """SGLang's algorithm, faithfully: with no load every miss goes to the lowest index."""
    router = build_router("cache-aware")
    snap = PoolSnapshot(fleet(4))
    picks = {router.route(req(f"distinct prompt {i} " * 30), snap).endpoint.id for i in range(20)}
    assert picks == {"e0"}


def test_cache_aware_balances_when_imbalanced():
    router = build_router("cache-aware")
    eps = fleet(2)
    eps[0].in_flight = 200
    eps[1].in_flight = 10
    router.route(req("shared " * 100), PoolSnapshot([eps[0]]))  # e0 holds the prefix
    assert router.route(req("shared " * 100), PoolSnapshot(eps)).endpoint.id == "e1"
    eps[0].in_flight = 20
    assert router.route(req("shared " * 100), PoolSnapshot(eps)).endpoint.id == "e0"


def test_default_keeps_prefix_affinity_under_moderate_load_and_leaves_a_saturated_holder():
    router = build_router("default")
    system = "system prompt of group A. " * 80
    eps = fleet(4)
    first = router.route(req(system + "q0"), PoolSnapshot(eps)).endpoint.id
    holder = next(e for e in eps if e.id == first)
    holder.in_flight, holder.running = 12, 12
    for e in eps:
        if e is not holder:
            e.in_flight = e.running = 4
    for i in range(10):
        assert router.route(req(system + f"q{i}"), PoolSnapshot(eps)).endpoint.id == first
    holder.queue = 20  # past the saturation threshold (5 waiting)
    assert router.route(req(system + "qx"), PoolSnapshot(eps)).endpoint.id != first


def test_every_preset_keeps_max_concurrency_over_affinity_and_fails_open_when_all_are_full():
    for preset in PRESETS:
        router = build_router(preset)
        eps = [EndpointView(f"e{i}", max_concurrency=1) for i in range(3)]
        text = "shared system prompt " * 40
        holder = router.route(req(text), PoolSnapshot(eps)).endpoint
        holder.in_flight = 1  # prefix and session affinity now point at a full endpoint
        for _ in range(5):
            assert router.route(req(text), PoolSnapshot(eps)).endpoint.id != holder.id, preset
        for e in eps:
            e.in_flight = 1
        assert router.route(req(text), PoolSnapshot(eps)) is not None, preset


def test_gie_preset_follows_queue_kv_prefix_weights():
    router = build_router("gie")
    eps = fleet(2)
    eps[0].queue, eps[1].queue = 0, 3
    assert router.route(req("hello " * 50), PoolSnapshot(eps)).endpoint.id == "e0"
    eps[0].kv_usage, eps[1].kv_usage = 0.9, 0.0
    # queue: e0 2.0 + kv 0.2; e1 0 + 2.0; the prefix (3.0) now held by e0 decides
    assert router.route(req("hello " * 50), PoolSnapshot(eps)).endpoint.id == "e0"
    res = router.route(req("fresh text " * 50), PoolSnapshot(eps))
    assert res.endpoint.id == "e0" and res.reason in {"queue", "kv-cache"}


def test_round_robin_and_max_score_tie_break():
    rr = build_router("round-robin")
    snap = PoolSnapshot(fleet(3))
    assert [rr.route(req("x"), snap).endpoint.id for _ in range(6)] == ["e0", "e1", "e2"] * 2
    gie = build_router("gie")
    picks = Counter(gie.route(RequestView("m"), snap).endpoint.id for _ in range(300))
    assert set(picks) == {"e0", "e1", "e2"} and min(picks.values()) > 60  # random, not positional


def test_unhealthy_and_stale_endpoints():
    router = build_router("default")
    eps = fleet(3)
    eps[0].healthy = False
    eps[1].metrics_age_s = 5.0  # stale: counts as saturated, filtered while another has room
    for _ in range(10):
        assert router.route(req("abc"), PoolSnapshot(eps)).endpoint.id == "e2"


def test_session_and_lora_affinity():
    router = build_router("default")
    eps = fleet(3)
    r = RequestView("m", session="user-1")
    first = router.route(r, PoolSnapshot(eps)).endpoint.id
    assert all(router.route(RequestView("m", session="user-1"), PoolSnapshot(eps)).endpoint.id == first
               for _ in range(5))
    eps[2].adapters_active = frozenset({"sql"})
    eps[0].max_lora = eps[1].max_lora = eps[2].max_lora = 1
    eps[0].adapters_active = frozenset({"other"})
    eps[1].adapters_active = frozenset({"other2"})
    assert router.route(RequestView("m", adapter="sql"), PoolSnapshot(eps)).endpoint.id == "e2"


@settings(max_examples=150, deadline=None)
@given(cap=st.integers(1, 50),
       ops=st.lists(st.tuples(st.sampled_from("abc"), st.lists(st.integers(0, 80), max_size=30)), max_size=40))
def test_approx_index_is_bounded_and_consistent(cap, ops):
    idx = ApproxPrefixIndex(capacity_per_endpoint=cap)
    for ep, hashes in ops:
        idx.insert(ep, hashes)
        for ep_ in "abc":
            assert len(idx.held_by(ep_)) <= cap
    lrus = {ep_: set(idx.held_by(ep_)) for ep_ in "abc"}
    held = {h for lru in lrus.values() for h in lru}
    for h in held | set(range(81)):
        assert idx.holders(h) == {e for e, lru in lrus.items() if h in lru}
    assert len(idx) == sum(len(idx.holders(h)) for h in held)


def test_text_hash_chain_is_a_prefix_chain():
    a = text_prefix_hashes(["x" * 640], "seed", 64, 256)
    b = text_prefix_hashes(["x" * 640, "more text"], "seed", 64, 256)
    assert len(a) == 10 and b[:10] == a
    assert text_prefix_hashes(["x" * 640], "other-salt", 64, 256)[0] != a[0]
    assert len(text_prefix_hashes(["y" * 100_000], "s", 64, 256)) == 256  # work is capped


def test_precise_index_from_engine_kv_events():
    space = KVKeySpace("0" * 64, "float32")
    tokens = list(range(64))
    hashes = space.hashes(tokens, "tenant-a")
    state = RoutingState()
    payload = encode_batch([BlockStored(hashes[:3], None, tokens[:48], 16)])
    assert apply_batch(state, "e1", decode_batch(payload)) == 1
    apply_batch(state, "e2", decode_batch(encode_batch([BlockStored(hashes[:4], None, tokens, 16, None, "host")])))
    assert state.precise.match("e1", hashes) == 3.0
    assert abs(state.precise.match("e2", hashes) - 3.2) < 1e-9
    apply_batch(state, "e1", decode_batch(encode_batch([BlockRemoved([hashes[1]])])))
    assert state.precise.match("e1", hashes) == 1.0
    r = RequestView("m", token_hashes=hashes)
    router = build_router("p", state, {"p": (["healthy"], {"precise-prefix": 1}, "max-score")})
    assert router.route(r, PoolSnapshot(fleet(3)[1:])).endpoint.id == "e2"


def test_precise_index_capacity():
    idx = PreciseIndex(capacity_per_endpoint=5)
    idx.stored("e", [bytes([i]) * 32 for i in range(20)])
    assert idx.blocks("e") == 5


def _rls_reference(w: list[float], p: list[list[float]], x: list[float], y: float) -> tuple[list, list]:
    """The TTFT model's update in its generator-expression form (what `_RLS.update` unrolls)."""
    px = [sum(p[i][j] * x[j] for j in range(3)) for i in range(3)]
    denom = 0.98 + sum(x[i] * px[i] for i in range(3))
    k = [v / denom for v in px]
    err = y - (w[0] * x[0] + w[1] * x[1] + w[2] * x[2])
    new_p = [[(p[i][j] - k[i] * px[j]) / 0.98 for j in range(3)] for i in range(3)]
    return [w[i] + k[i] * err for i in range(3)], new_p


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, -0.0, 0.25, 1.7, 3.0]), st.sampled_from([0.0, -0.0, 1.0, 7.0, 40.0]),
                          st.sampled_from([0.0, -0.0, 0.004, 0.3, 2.5])), min_size=1, max_size=40))
def test_latency_model_update_is_the_generator_form_bit_for_bit(obs):
    from inferstack.gateway.routing.latency import _RLS

    m, w, p = _RLS(), _RLS().w, _RLS().p
    for ktokens, load, ttft in obs:
        x = [1.0, ktokens, load]
        m.update(x, ttft)
        w, p = _rls_reference(w, p, x, ttft)
        assert [v.hex() for v in m.w] == [v.hex() for v in w]
        assert [[v.hex() for v in row] for row in m.p] == [[v.hex() for v in row] for row in p]


def test_latency_model_learns_the_slower_endpoint():
    state = RoutingState()
    for _ in range(50):
        state.latency.observe("slow", 500, 2, 0.5, 0.05)
        state.latency.observe("fast", 500, 2, 0.05, 0.01)
    assert state.latency.predict_ttft("slow", 500, 2) > 5 * state.latency.predict_ttft("fast", 500, 2)
    eps = [EndpointView("slow", in_flight=2), EndpointView("fast", in_flight=2)]
    router = build_router("latency", state)
    assert router.route(req("p" * 2000), PoolSnapshot(eps)).endpoint.id == "fast"


def _warm(state: RoutingState, placement: dict[str, int]) -> None:
    """Each endpoint keeps ``placement[e]`` shared prompts warm (each routed to it twice)."""
    for e, n in placement.items():
        for g in range(n):
            r = req(f"tenant {e}-{g} system prompt " * 20)
            state.record(r, e, cold=False)
            state.record(r, e, cold=False)


def test_default_sends_a_new_shared_prompt_where_the_fewest_live_despite_its_load():
    """Recorded on the held-out load (gateway_routing.py, 32 Zipf tenants, engines holding 8 prompts each):
    the endpoint with the hottest tenant carries more requests but fewer prompts. A new tenant sent to a
    less-loaded endpoint that already keeps 8 warm evicted one of them there on every rare request."""
    loads = {"e0": 9, "e1": 2, "e2": 2, "e3": 3}
    eps = [EndpointView(e, has_metrics=True, metrics_age_s=0.01, in_flight=n, running=n) for e, n in loads.items()]
    new = req("a new tenant's system prompt " * 20)
    picks = []
    for profile in (PRESETS["default"](),  # and the same without the spread (the seventh stop's default)
                    make_profile("old", ["healthy", "not-overloaded"],
                                 {"prefix": 3, "in-flight": 2, "kv-cache": 1, "cold-spread": 1}, "max-score")):
        state = RoutingState()
        _warm(state, {"e0": 7, "e1": 8, "e2": 8, "e3": 8})
        picks.append(profile.pick(RouteContext(new, PoolSnapshot(eps), state), eps).endpoint.id)
    assert picks[0] == "e0" and picks[1] in {"e1", "e2"}


def test_a_burst_of_new_prompts_spreads_before_any_is_reused():
    """Recorded at the held-out load's start: e1 kept no reused prompt yet, and four new tenants arriving
    within 30 ms all went there (then it was overloaded and two hot tenants spilled onto a second
    engine). A prompt routed once counts too, for a while: one new prompt per endpoint."""
    state = RoutingState()
    _warm(state, {"e0": 1, "e2": 1, "e3": 1})
    state.record(req("e1's first tenant " * 20), "e1", cold=True)
    router = build_router("default", state)
    snap = PoolSnapshot(fleet(4))
    picks = [router.route(req(f"burst tenant {i} " * 20), snap).endpoint.id for i in range(4)]
    assert Counter(picks) == {"e0": 1, "e1": 1, "e2": 1, "e3": 1}


def test_prefix_spread_is_neutral_for_distinct_prompts_and_forgets_quiet_ones():
    state = RoutingState()
    for i in range(50):   # every prompt distinct: nothing to keep warm, the load decides
        state.record(req(f"one-off {i} " * 20), f"e{i % 2}", cold=True)
    ctx = RouteContext(req("another one-off " * 20), PoolSnapshot(fleet(2)), state)
    assert not state.roots.sharing() and SCORERS["prefix-spread"](ctx, fleet(2)) == [1.0, 1.0]
    roots = ReusedRoots(reused_horizon=8, single_horizon=2)
    roots.record("a", 1)
    roots.record("a", 1)     # reused: counted for 8 decisions after its last use
    roots.record("b", 2)     # routed once: counted for 2
    assert roots.counts() == {"a": 1, "b": 1} and roots.sharing()
    roots.record("b", 3)
    roots.record("b", 4)
    assert roots.counts() == {"a": 1, "b": 2}   # root 2 went quiet
    for r in range(5, 10):
        roots.record("b", r)
    assert roots.counts() == {"a": 0, "b": 2} and not roots.sharing()
    roots.record("b", 5)     # 5 decisions after its first use: no longer counted, still remembered
    assert roots.sharing() and roots.counts()["b"] == 2   # reused now (5), plus the latest one-off (9)


def _pick_with_every_list(profile, ctx: RouteContext, cands: list[EndpointView]) -> tuple[str, str] | None:
    """`Profile.pick` as written before uniform scores were added as one number: every scorer's list."""
    for _, f in profile.filters:
        cands = f(ctx, cands)
        if not cands:
            return None
    if len(cands) == 1:
        return cands[0].id, "only"
    parts = [(n, w, s(ctx, cands)) for n, s, w in profile.scorers if w != 0]
    totals = [sum((w * min(1.0, max(0.0, s[i])) for _, w, s in parts), 0.0) for i in range(len(cands))]
    i = profile.picker(ctx, cands, totals)
    return cands[i].id, _deciding_scorer(i, totals, parts)


@settings(max_examples=150, deadline=None)
@given(eps=st.lists(endpoint_st, min_size=1, max_size=5, unique_by=lambda e: e.id),
       history=st.lists(st.tuples(st.sampled_from(["p1", "p2", "p3"]), st.sampled_from(["a", "b", "c"]),
                                  st.sampled_from([None, "s"])), max_size=8),
       text=st.sampled_from(["p1", "p2", "p4", ""]), adapter=st.sampled_from([None, "l1"]),
       session=st.sampled_from([None, "s", "t"]), seed=st.integers(0, 3))
def test_uniform_scores_added_as_one_number_decide_as_every_list(eps, history, text, adapter, session, seed):
    """A scorer's `UNIFORM` check gives the value of each of its scores, and the default profile's pick with
    those added as one number is the pick over every scorer's list (endpoint, reason and tie-break draw)."""
    state = RoutingState(rng=random.Random(seed))
    for prompt, endpoint, sess in history:
        h = req(prompt * 40)
        h.session = sess
        state.record(h, endpoint, cold=True)
    r = req(text * 40)
    r.adapter, r.session = adapter, session
    snap = PoolSnapshot(eps)
    for scorer, same in UNIFORM.items():
        v = same(RouteContext(r, snap, state))
        assert v is None or scorer(RouteContext(r, snap, state), list(eps)) == [v] * len(eps)
    profile = PRESETS["default"]()
    rng_before = state.rng.getstate()
    got = profile.pick(RouteContext(r, snap, state), list(eps))
    rng_after = state.rng.getstate()
    state.rng.setstate(rng_before)
    expected = _pick_with_every_list(profile, RouteContext(r, snap, state), list(eps))
    assert (None if got is None else (got.endpoint.id, got.reason)) == expected
    assert state.rng.getstate() == rng_after


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(st.tuples(st.sampled_from(["", "s" * 70, "é" * 90, "\ud800x" * 40, "sys " * 300]),
                                   st.lists(st.text(max_size=150), max_size=4), st.sampled_from(["m\x00", "m\x00t"]),
                                   st.booleans()),
                         min_size=1, max_size=6),
       step=st.sampled_from([4, 16, 64]), most=st.sampled_from([1, 3, 128]))
def test_prefix_hasher_remembers_leads_without_changing_a_hash(requests, step, most):
    """The chain with a remembered lead is the chain over the whole text, hit or miss, after evictions; a chat's
    parts (role, separator, content, ...) and a prompt's alike."""
    hasher = PrefixHasher(step, most, capacity=2)
    for first, rest, seed, chat in requests + requests:
        parts = ["system", "\x1e", first, "\x1f", *rest] if chat else [first, *rest]
        assert hasher.hashes(parts, seed) == text_prefix_hashes(parts, seed, step, most), (parts, step, most)
    assert len(hasher) <= 2


def test_prefix_hasher_remembers_a_system_prompt_not_a_lone_message():
    hasher = PrefixHasher(64, 128)
    system = ["system", "\x1e", "s" * 2000, "\x1f"]
    for turn in ("a" * 100, "b" * 100):
        hasher.hashes([*system, "user", "\x1e", turn, "\x1f"], "m\x00")
    assert len(hasher) == 1
    hasher.hashes(["user", "\x1e", "c" * 3000, "\x1f"], "m\x00")
    assert len(hasher) == 1


def test_approx_index_keeps_lru_order_through_reinserts_and_compactions():
    """Each endpoint's hashes evict least recently inserted first, as an ordered dict would keep them, through
    thousands of re-inserts of held prompts (the stale copies are compacted away, so the order stays bounded)."""
    rng = random.Random(7)
    cap = 40
    idx = ApproxPrefixIndex(capacity_per_endpoint=cap)
    model: dict[str, OrderedDict[int, None]] = {e: OrderedDict() for e in "ab"}
    prompts = [[rng.getrandbits(20) for _ in range(rng.randint(1, 12))] for _ in range(12)]
    for _ in range(8000):
        # mostly four hot prompts that fit (their stale copies pile up until compacted), now and then a cold one
        ep, hashes = rng.choice("ab"), rng.choice(prompts[:4] if rng.random() < 0.9 else prompts)
        idx.insert(ep, hashes)
        lru = model[ep]
        for h in hashes:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > cap:
            lru.popitem(last=False)
        assert idx.held_by(ep) == list(lru)
        assert len(idx._lru[ep].order) <= 2 * cap + 1024 + len(hashes)


def test_approx_match_runs_of_shared_and_sole_blocks():
    """Each endpoint's own run when holders share blocks, drop out one by one, or one goes on alone (the set
    operations per block and the lone holder's count, `ApproxPrefixIndex.match`)."""
    idx = ApproxPrefixIndex()
    idx.insert("a", [1, 2, 3, 4, 5, 6])
    idx.insert("b", [1, 2, 3, 4])
    idx.insert("c", [1, 2])
    assert idx.match([1, 2, 3, 4, 5, 6, 7]) == {"a": 6, "b": 4, "c": 2}   # c, then b drop out; a goes on alone
    assert idx.match([1, 2, 9]) == {"a": 2, "b": 2, "c": 2}                # a block nobody holds ends every run
    assert idx.match([1, 5, 6]) == {"a": 3, "b": 1, "c": 1}                # only a holds the second block
    assert idx.match([2, 1]) == {"a": 2, "b": 2, "c": 2}
    assert idx.match([6, 5, 1]) == {"a": 3}                                # a lone holder first
    assert idx.match([7, 1]) == {} and idx.match([]) == {}
    idx.insert("d", [8])
    assert idx.match([1, 8]) == {"a": 1, "b": 1, "c": 1}                   # d holds the second block, not the first


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("abc"), st.lists(st.integers(0, 12), max_size=8)), max_size=12),
       query=st.lists(st.integers(0, 12), max_size=10), cap=st.integers(1, 20))
def test_approx_match_is_each_endpoints_leading_run(ops, query, cap):
    """`match` gives each endpoint the blocks it holds from the start of the request, consecutively."""
    idx = ApproxPrefixIndex(capacity_per_endpoint=cap)
    for ep, hashes in ops:
        idx.insert(ep, hashes)
    expected = {}
    for ep in "abc":
        held = set(idx.held_by(ep))
        run = next((i for i, h in enumerate(query) if h not in held), len(query))
        if run:
            expected[ep] = run
    assert idx.match(query) == expected


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.sampled_from(["p1", "p2", "p3", "p4"]), min_size=1, max_size=12),
       preset=st.sampled_from(sorted(PRESETS)), seed=st.integers(0, 3))
def test_a_deferred_record_leaves_the_state_as_an_immediate_one(prompts, preset, seed):
    """`route(defer=True)` changes no routing state until its `pending` record runs; run right after, every
    decision and the prefix index are those of routing with the record made at once."""
    now, later = (build_router(preset, RoutingState(rng=random.Random(seed))) for _ in range(2))
    snap = PoolSnapshot(fleet(3))
    for p in prompts:
        r = req(p * 40)
        got = now.route(r, snap)
        before = later.state.approx.match(r.prefix_hashes)
        deferred = later.route(r, snap, defer=True)
        assert later.state.approx.match(r.prefix_hashes) == before  # nothing recorded yet
        assert deferred.pending is not None and got.pending is None
        deferred.pending()
        assert (deferred.endpoint.id, deferred.reason) == (got.endpoint.id, got.reason)
        assert later.state.approx.match(r.prefix_hashes) == now.state.approx.match(r.prefix_hashes)
        assert later.state.cold_served == now.state.cold_served
