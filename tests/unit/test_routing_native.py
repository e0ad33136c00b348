"""The compiled pick (`routing.native`) decides exactly as the Python steps: the same endpoint, tie-break draw and
reason, and so the same routing-state updates, over random pools, request sequences and profiles; a profile or a
request it does not cover, and a process without it, route through the Python steps."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.gateway.routing import EndpointView, PoolSnapshot, RequestView, native
from inferstack.gateway.routing.prefix import ApproxPrefixIndex
from inferstack.gateway.routing.profiles import Router
from inferstack.gateway.routing.registry import build_router, make_profile
from inferstack.gateway.routing.state import RoutingState

# every preset the compiled pick covers, and custom profiles over all its filters and scorers
PROFILES: dict[str, tuple[list[str], dict[str, float], str] | None] = {
    "default": None, "gie": None, "least-load": None,
    "all": (["healthy", "not-overloaded"], {"prefix": 2, "running": 1, "queue": 1, "lora-affinity": 1, "in-flight": 1.5,
                                            "kv-cache": 0.5, "cold-spread": 1, "prefix-spread": 1.5,
                                            "session-affinity": 2, "least-load": 0.25}, "max-score"),
    "filters-only": (["healthy", "not-overloaded", "not-overloaded"], {}, "max-score"),
    "negative": (["healthy"], {"prefix": -1, "in-flight": 3, "cold-spread": 0}, "max-score"),
}


@pytest.fixture(autouse=True)
def _fresh_switch() -> Iterator[None]:
    native.native.cache_clear()
    yield
    native.native.cache_clear()


def _routers(profile: str, seed: int) -> tuple[Router, Router]:
    """(compiled, Python) routers of ``profile`` with identically seeded states."""
    custom = {profile: PROFILES[profile]} if PROFILES[profile] else None
    compiled = build_router(profile, RoutingState(rng=random.Random(seed)), custom)
    with pytest.MonkeyPatch.context() as m:
        m.setenv(native.ENV, "0")
        native.native.cache_clear()
        python = build_router(profile, RoutingState(rng=random.Random(seed)), custom)
    native.native.cache_clear()
    policy = compiled.handler.policy  # type: ignore[attr-defined]
    if policy._lib is None:
        pytest.skip("compiled routing unavailable (no C compiler, or INFERSTACK_NATIVE_ROUTING=0)")
    assert python.handler.policy._lib is None  # type: ignore[attr-defined]
    return compiled, python


number = st.one_of(st.sampled_from([0.0, 1.0, 2.0, 5.0, 16.0, 40.0]), st.floats(0, 64, allow_nan=False),
                   st.integers(0, 50))
views = st.builds(
    EndpointView, id=st.sampled_from([f"e{i}" for i in range(24)]), queue=number, running=number,
    kv_usage=st.one_of(st.sampled_from([0.0, 0.5, 0.95, 1.0]), st.floats(-0.5, 1.5, allow_nan=False)),
    metrics_age_s=st.one_of(st.sampled_from([0.01, 0.2, 0.5, float("inf")]), st.floats(0, 3, allow_nan=False)),
    has_metrics=st.booleans(), in_flight=st.integers(0, 60), healthy=st.booleans(),
    max_concurrency=st.one_of(st.none(), st.integers(0, 8)), held=st.integers(0, 6))


def _unique(pool: list[EndpointView]) -> list[EndpointView]:
    seen: dict[str, EndpointView] = {}
    for v in pool:
        seen.setdefault(v.id, v)
    return list(seen.values())


def _requests(rng: random.Random, count: int) -> list[RequestView]:
    prefixes = [[rng.getrandbits(40) for _ in range(6)] for _ in range(4)]
    out = []
    for _ in range(count):
        hashes = rng.choice(prefixes)[:rng.randint(0, 6)] + [rng.getrandbits(40) for _ in range(rng.randint(0, 2))]
        out.append(RequestView("m", prefix_hashes=hashes, prompt_chars=64 * len(hashes) + 1,
                               session=rng.choice([None, None, "s1", "s2"]),
                               adapter=rng.choice([None, None, None, None, "lora-a"])))
    return out


def _trace(router: Router, pool: list[EndpointView], reqs: list[RequestView], stale: float,
           rng: random.Random) -> list[tuple[str, str, int]]:
    """Route ``reqs`` in turn over ``pool`` (in-flight counts and gauges moving between picks): each pick's
    endpoint, reason and the tie-break rng's next draw (the same draws so far)."""
    out = []
    for k, req in enumerate(reqs):
        result = router.route(req, PoolSnapshot(pool, 0.0, stale))
        out.append((result.endpoint.id, result.reason, router.state.rng.getrandbits(16)) if result else ("", "", -1))
        if result is not None:
            result.endpoint.in_flight += 1
        if k % 5 == 4:
            for v in pool:
                v.queue, v.kv_usage = float(rng.choice([0, 1, 5, 20])), rng.choice([0.1, 0.85, 1.0])
    return out


@pytest.mark.parametrize("profile", sorted(PROFILES))
@settings(max_examples=60, deadline=None)
@given(pool=st.lists(views, min_size=0, max_size=24), seed=st.integers(0, 2**32 - 1),
       stale=st.sampled_from([0.2, 0.3, 1.0]))
def test_compiled_picks_equal_the_python_steps(profile: str, pool: list[EndpointView], seed: int,
                                               stale: float) -> None:
    compiled, python = _routers(profile, seed)
    pool = _unique(pool)   # ids are unique in a pool; up to 24 endpoints also runs the larger-pool buffers
    reqs = _requests(random.Random(seed), 40)
    got = _trace(compiled, copy.deepcopy(pool), reqs, stale, random.Random(seed))
    want = _trace(python, copy.deepcopy(pool), reqs, stale, random.Random(seed))
    assert got == want
    assert compiled.state.cold_served == python.state.cold_served
    assert compiled.state.roots.counts() == python.state.roots.counts()


def test_ties_draw_from_the_state_rng_like_the_python_picker() -> None:
    """Eight idle endpoints and distinct cold prompts: ties, decided by the same draws."""
    compiled, python = _routers("default", 7)
    pool = [EndpointView(f"e{i}") for i in range(8)]
    reqs = [RequestView("m", prefix_hashes=[i]) for i in range(30)]
    got = _trace(compiled, copy.deepcopy(pool), reqs, 0.2, random.Random(1))
    assert got == _trace(python, copy.deepcopy(pool), reqs, 0.2, random.Random(1))
    assert got[0][1] == "tie" and len({endpoint for endpoint, _, _ in got}) > 1


class _LooseView(EndpointView):
    """A view with a __dict__ (no slots of its own): read through attribute lookups, not slot offsets."""


def test_views_of_another_type_are_read_by_attribute() -> None:
    compiled, python = _routers("default", 5)
    rng = random.Random(5)
    pool: list[EndpointView] = [EndpointView("a", has_metrics=True, metrics_age_s=0.01, in_flight=3)]
    pool += [_LooseView(f"l{i}", has_metrics=True, metrics_age_s=0.01, queue=float(i), in_flight=i % 3,
                        kv_usage=0.1 * i, max_concurrency=4 if i % 2 else None) for i in range(5)]
    reqs = _requests(rng, 30)
    for order in (pool, pool[::-1]):
        got = _trace(compiled, copy.deepcopy(order), reqs, 0.2, random.Random(2))
        assert got == _trace(python, copy.deepcopy(order), reqs, 0.2, random.Random(2))


def test_coverage_and_fallbacks() -> None:
    assert native.spec(["healthy", "not-overloaded"], [("prefix", 3), ("in-flight", 0)], "max-score") == (
        (0, 1), ((0, 3.0, "prefix"),))
    assert native.spec(["not-saturated"], [], "max-score") is None             # filter without a twin
    assert native.spec(["healthy"], [("predicted-latency", 1)], "max-score") is None
    assert native.spec(["healthy"], [], "round-robin") is None                 # picker without a twin
    custom = make_profile("x", ["healthy"], {"in-flight": 1}, "max-score")
    custom.scorers = [("in-flight", lambda ctx, cands: [0.0] * len(cands), 1.0)]
    custom.__post_init__()
    assert custom._spec is None            # a custom callable under a known name: its own Python step
    # an adapter request on a profile with lora-affinity goes through the Python steps, with the same answer
    compiled, python = _routers("default", 3)
    pool = [EndpointView("a", adapters_active=frozenset({"l"})), EndpointView("b", max_lora=1)]
    req = RequestView("m", adapter="l")
    a = compiled.route(req, PoolSnapshot(pool, 0.0))
    b = python.route(req, PoolSnapshot(copy.deepcopy(pool), 0.0))
    assert a is not None and b is not None
    assert (a.endpoint.id, a.reason) == (b.endpoint.id, b.reason) == ("a", "lora-affinity")


def test_switched_off_or_without_a_compiler_routes_in_python(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=native.__name__)
    monkeypatch.setenv(native.ENV, "0")
    assert native.native() is None and "compiled pick off" in caplog.text
    native.native.cache_clear()
    monkeypatch.delenv(native.ENV)
    monkeypatch.setenv("INFERSTACK_CACHE_DIR", str(tmp_path))      # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.native() is None
    assert "compiled pick unavailable" in caplog.text
    router = build_router("default")
    assert router.handler.policy._lib is None  # type: ignore[attr-defined]
    pick = router.route(RequestView("m", prefix_hashes=[1]), PoolSnapshot([EndpointView("a"), EndpointView("b")]))
    assert pick is not None and pick.reason == "tie"   # two idle endpoints, a cold prompt
    assert not list(tmp_path.rglob("*.so"))


def test_builds_once_into_the_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("INFERSTACK_CACHE_DIR", str(tmp_path))
    lib = native.native()
    if lib is None:
        pytest.skip("compiled routing unavailable (no C compiler, or INFERSTACK_NATIVE_ROUTING=0)")
    built = list((tmp_path / "extensions").glob("inferstack_route_*"))
    assert [p.name for p in built] == [native.library_path().name]
    assert [p.name for p in (tmp_path / "extensions").iterdir()] == [built[0].name]   # no temporary left


def _indexes(capacity: int) -> tuple[ApproxPrefixIndex, ApproxPrefixIndex]:
    """(compiled insert loop, Python loop) prefix indexes."""
    compiled = ApproxPrefixIndex(capacity)
    with pytest.MonkeyPatch.context() as m:
        m.setenv(native.ENV, "0")
        native.native.cache_clear()
        python = ApproxPrefixIndex(capacity)
    native.native.cache_clear()
    if compiled._compiled_loop is None:
        pytest.skip("compiled routing unavailable (no C compiler, or INFERSTACK_NATIVE_ROUTING=0)")
    assert python._compiled_loop is None
    return compiled, python


def _state(index: ApproxPrefixIndex) -> tuple:
    lrus = {e: (list(lru.order), dict(lru.stale), lru.live) for e, lru in index._lru.items()}
    holders = {h: s if type(s) is str else sorted(s) for h, s in index._holders.items()}
    return lrus, holders


@settings(max_examples=150, deadline=None)
@given(inserts=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.lists(st.integers(0, 40), max_size=12)),
                        max_size=40),
       capacity=st.sampled_from([4, 16, 1000]))
def test_compiled_insert_loop_keeps_the_same_index(inserts: list[tuple[str, list[int]]], capacity: int) -> None:
    """Held, shared, new and repeated hashes, evictions: the same LRU orders, stale counts, holders and matches."""
    compiled, python = _indexes(capacity)
    for endpoint, hashes in inserts:
        compiled.insert(endpoint, hashes)
        python.insert(endpoint, hashes)
        assert _state(compiled) == _state(python)
        assert compiled.match(hashes) == python.match(hashes)
    for e in "abc":
        assert compiled.held_by(e) == python.held_by(e)


@settings(max_examples=150, deadline=None)
@given(inserts=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 12), st.integers(0, 3)),
                        max_size=30),
       queries=st.lists(st.lists(st.integers(0, 20), max_size=16), max_size=20))
def test_compiled_match_answers_as_the_python_match(inserts: list[tuple[str, int, int]],
                                                    queries: list[list[int]]) -> None:
    """Runs of shared and sole blocks, holders dropping out at different blocks, a lone holder going on after the
    others stopped: the same counts (insert order included) for chains and random hash lists."""
    compiled, python = _indexes(1000)
    chain = list(range(16))
    for endpoint, length, skip in inserts:     # a chain's first ``length`` blocks, less its block ``skip``
        hashes = [h for h in chain[:length] if h != skip or length < 6]
        compiled.insert(endpoint, hashes)
        python.insert(endpoint, hashes)
    for hashes in [chain, chain[:3], [], *queries]:
        got, want = compiled.match(hashes), python.match(hashes)
        assert got == want and list(got) == list(want), hashes
