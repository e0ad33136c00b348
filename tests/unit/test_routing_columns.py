"""Columnar routing (`routing.columns`) decides exactly as the Python profile path: same endpoint, same
tie-break draw, same reason, same routing-state updates, over random pools and request sequences."""

from __future__ import annotations

import random

import pytest

from inferstack.gateway.routing import EndpointView, PoolSnapshot, RequestView
from inferstack.gateway.routing.columns import EndpointColumns
from inferstack.gateway.routing.registry import build_router, make_profile
from inferstack.gateway.routing.state import RoutingState

PROFILES = {
    "default": None, "gie": None, "least-load": None, "round-robin": None,
    # a custom profile mixing twins and Python fallbacks (predicted-latency, running, power-of-two picker)
    "mixed": (["healthy", "not-overloaded"], {"prefix": 2, "running": 1, "queue": 1, "lora-affinity": 1}, "max-score"),
    # scores that are one float before the first column (summed into the totals' start), a kept column
    # (kv-cache's memo) as the first term with weight 1, then columns and floats after it
    "lead": (["healthy"], {"session-affinity": 0.5, "lora-affinity": 2, "kv-cache": 1, "in-flight": 1.5,
                           "prefix": 1, "cold-spread": 1}, "max-score"),
}


def _pool(rng: random.Random, n: int) -> list[EndpointView]:
    views = []
    for i in range(n):
        has = rng.random() < 0.8
        views.append(EndpointView(
            f"e{i}", queue=float(rng.choice([0, 0, 1, 3, 9])), running=float(rng.choice([0, 2, 4, 8])),
            kv_usage=rng.choice([0.0, 0.3, 0.95, 1.0]), has_metrics=has,
            metrics_age_s=rng.choice([0.01, 0.5]) if has else float("inf"), in_flight=rng.choice([0, 0, 1, 2, 6, 30]),
            healthy=rng.random() < 0.9, max_concurrency=rng.choice([None, None, 4])))
    return views


def _requests(rng: random.Random, count: int) -> list[RequestView]:
    prefixes = [[rng.getrandbits(40) for _ in range(6)] for _ in range(5)]
    out = []
    for _ in range(count):
        base = rng.choice(prefixes)
        hashes = base[:rng.randint(0, 6)] + [rng.getrandbits(40) for _ in range(rng.randint(0, 3))]
        out.append(RequestView("m", prefix_hashes=hashes, prompt_chars=64 * len(hashes) + 1,
                               session=rng.choice([None, None, "s1", "s2"]),
                               adapter=rng.choice([None, None, None, "lora-a"])))
    return out


def _run(profile: str, seed: int, columnar: bool, count: int = 60, scrape_every: int = 7,
         sizes: tuple[int, ...] = (1, 2, 7, 40), cold_share: float = 0.0) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    views = _pool(rng, rng.choice(sizes))
    reqs = _requests(rng, count)
    for r in reqs:           # a prompt nobody sent before: a cold pick
        if rng.random() < cold_share:
            r.prefix_hashes = [rng.getrandbits(40)]
    custom = {profile: PROFILES[profile]} if PROFILES[profile] else None
    router = build_router(profile, RoutingState(rng=random.Random(seed)), custom)
    assert router.columnar()
    snap = PoolSnapshot(views, 0.0, 0.2, columns=EndpointColumns.of(views) if columnar else None)
    out = []
    for k, req in enumerate(reqs):
        result = router.route(req, snap)
        out.append((result.endpoint.id, result.reason, router.state.rr_counter) if result else ("", "", 0))
        if result is not None:
            result.endpoint.in_flight += 1
            if snap.columns is not None:     # the owner keeps the columns in step (as `SimGateway.shift`)
                snap.columns.shift(result.endpoint.id, result.endpoint.in_flight)
        if k % scrape_every == 3:           # a scrape: the engines' gauges move, the owner rebuilds the columns
            for v in views:
                v.queue = float(rng.choice([0, 1, 5]))
                v.kv_usage = rng.choice([0.1, 0.85])
            snap = PoolSnapshot(views, 0.0, 0.2, columns=EndpointColumns.of(views) if columnar else None)
    return out


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_columnar_picks_are_identical(profile: str) -> None:
    for seed in range(40):
        assert _run(profile, seed, True) == _run(profile, seed, False), (profile, seed)


def test_cold_ranks_stay_exact_over_long_runs_between_scrapes() -> None:
    """Many cold picks on one set of columns: the cold keys are renumbered (every 4n + 16 picks) on the way."""
    for seed in range(6):
        args = ("default", seed)
        kw = {"count": 200, "scrape_every": 1000, "sizes": (3, 7, 12), "cold_share": 0.8}
        assert _run(*args, True, **kw) == _run(*args, False, **kw), seed


def test_columnar_covers_the_default_profile_and_falls_back_elsewhere() -> None:
    assert build_router("default").columnar() and build_router("round-robin").columnar()
    assert not build_router("cache-aware").columnar()          # not a Profile: the Python path
    assert not build_router("power-of-two").columnar()         # picker without a twin
    p = make_profile("x", ["healthy", "not-saturated"], {"in-flight": 1}, "max-score")
    assert not p.columnar()                                    # filter without a twin


def test_columns_follow_in_flight_shifts() -> None:
    views = _pool(random.Random(3), 5)
    cols = EndpointColumns.of(views)
    views[2].in_flight += 4
    cols.shift("e2", views[2].in_flight)
    cols.shift("gone", 9)                      # not in this snapshot: ignored
    assert list(cols.in_flight) == [float(v.in_flight) for v in views]


def test_live_pool_tie_breaks_follow_the_injected_rng() -> None:
    """The live gateway's router draws its tie-breaks from the rng it is given (`Pipeline(rng=...)`)."""
    from inferstack.config.schema import GatewayConfig, PoolConfig
    from inferstack.gateway.datalayer import Pool

    cfg = PoolConfig(endpoints=[f"http://127.0.0.1:{9000 + i}" for i in range(8)])

    def picks(seed: int) -> list[str]:
        pool = Pool.from_config("p", cfg, GatewayConfig(), rng=random.Random(seed))
        # distinct cold prompts on an idle pool: every pick is a tie among the least recently cold-served
        return [pool.router.route(RequestView("m", prefix_hashes=[i]), pool.snapshot()).endpoint.id  # type: ignore[union-attr]
                for i in range(16)]

    assert picks(5) == picks(5)
    assert picks(5) != picks(6)


def test_aged_columns_score_as_columns_built_at_that_age() -> None:
    """`set_age` keeps the staleness and kv-cache memos while the age stays on one side of the limit and
    drops them when it crosses: after every ageing they equal those of columns built from views of that age."""
    for limit in (0.2, 0.12):
        views = _pool(random.Random(11), 40)
        cols = EndpointColumns.of(views)
        for age in (0.01, 0.1, 0.3, 0.25, 0.15, 0.2, 0.21, 0.05, 0.5, 0.0):
            cols.set_age(age)
            for v in views:
                if v.has_metrics:
                    v.metrics_age_s = age
            fresh = EndpointColumns.of(views)
            assert list(cols.stale(limit)) == list(fresh.stale(limit)), (age, limit)
            assert list(cols.kv_scores(limit)) == list(fresh.kv_scores(limit)), (age, limit)
