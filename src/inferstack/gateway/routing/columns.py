"""A columnar mirror of a snapshot's endpoints, and the profile steps evaluated over it.

Scoring every endpoint per request in Python dominated the simulator at 1,000 replicas (~70 % of its time
with the `default` profile). An owner that keeps numpy columns in step with its `EndpointView`s (the
simulator's gateway: once per scrape tick, plus each in-flight change) attaches them to the
`PoolSnapshot`; `Profile.pick` then runs its filters, scorers and picker here at C speed. Every step
computes the same IEEE operations in the same order as its Python twin in `filters`/`scorers`/`pickers`,
so the decisions, the tie-break draws and the reasons are identical (tests/unit/test_routing_columns.py
compares both paths). Steps without a twin here fall back to the Python function over the candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from inferstack.gateway.routing.filters import OVERLOAD_SLACK
from inferstack.gateway.routing.pickers import _EPS
from inferstack.gateway.routing.scorers import _LOAD_SOFTNESS
from inferstack.gateway.routing.state import RouteContext
from inferstack.gateway.routing.types import EndpointView

Idx = np.ndarray          # ascending positions into the snapshot's endpoints (the candidates, in order)
# the reductions ndarray.min / .max run, called without their Python-level wrappers (once per request each)
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce


def _at(column: np.ndarray, idx: Idx) -> np.ndarray:
    """``column[idx]``; the column itself when the candidates are every endpoint (ascending positions, so
    as many as the column's rows means all of them): a gather less per step. Callers never write to it."""
    return column if idx.size == column.size else column[idx]


@dataclass(eq=False)
class EndpointColumns:
    """``columns[i]`` mirrors ``snapshot.endpoints[i]``; the owner keeps them in step."""

    views: Sequence[EndpointView]
    index: dict[str, int]
    in_flight: np.ndarray
    queue: np.ndarray
    running: np.ndarray
    kv_usage: np.ndarray
    metrics_age: np.ndarray
    has_metrics: np.ndarray
    healthy: np.ndarray
    cap: np.ndarray               # max_concurrency, 0 for none
    held: np.ndarray              # requests held at the gateway for the endpoint's room (`EndpointView.held`)
    # the routing state's cold-served stamps per endpoint, as of `cold_clock` (-1: not built yet), and
    # `cold_keys`: small integers in the stamps' order (equal keys for equal stamps, all below `cold_next`),
    # so a candidate set's ranks come from a cumulative count over the keys instead of a sort
    cold_stamps: np.ndarray | None = None
    cold_clock: int = -1
    cold_keys: np.ndarray | None = None
    cold_next: int = 0
    # Derived columns, kept until what they read changes (`shift`: in-flight counts, `set_age`: scrape ages;
    # the rest only changes with a new `EndpointColumns`): queue + running, `loads`, staleness and kv-cache
    # scores for one staleness limit, the healthy positions when no endpoint has a concurrency cap
    _queued: np.ndarray | None = None
    _loads: np.ndarray | None = None
    _stale: tuple[float, np.ndarray] | None = None
    _kv_scores: tuple[float, np.ndarray] | None = None
    _uncapped_idx: Idx | None = None
    _age: float | None = None     # the age `set_age` gave every scraped endpoint (None: not called yet)
    # the last filter results by the identity of their inputs (arrays are never changed in place)
    _healthy_of: tuple[Idx, Idx] | None = None
    _fresh_of: tuple[Idx, np.ndarray, Idx] | None = None

    @classmethod
    def of(cls, views: Sequence[EndpointView]) -> EndpointColumns:
        n = len(views)

        def col(get: Callable[[EndpointView], float], dtype: type = np.float64) -> np.ndarray:
            return np.fromiter(map(get, views), dtype=dtype, count=n)

        # attribute getters at C speed: the simulator rebuilds these at every scrape tick over 1,000 endpoints
        return cls(views, {v.id: i for i, v in enumerate(views)}, col(attrgetter("in_flight")),
                   col(attrgetter("queue")), col(attrgetter("running")), col(attrgetter("kv_usage")),
                   col(attrgetter("metrics_age_s")), col(attrgetter("has_metrics"), np.bool_),
                   col(attrgetter("healthy"), np.bool_), col(lambda v: v.max_concurrency or 0),
                   col(attrgetter("held")))

    def shift(self, endpoint: str, in_flight: int) -> None:
        """``endpoint``'s in-flight count is now ``in_flight`` (ignored if it is not in this snapshot)."""
        i = self.index.get(endpoint)
        if i is not None:
            self.in_flight[i] = in_flight
            self._loads = None

    def shift_held(self, endpoint: str, held: int) -> None:
        """``endpoint``'s held count is now ``held`` (ignored if it is not in this snapshot)."""
        i = self.index.get(endpoint)
        if i is not None:
            self.held[i] = held
            self._loads = None

    def loads(self) -> np.ndarray:
        if self._loads is None:
            if self._queued is None:
                self._queued = self.queue + self.running
            self._loads = np.maximum(self.in_flight, self._queued) + self.held   # `EndpointView.load`
        return self._loads

    def set_age(self, age: float) -> None:
        """Every scrape is ``age`` old now (the owner's scrapes all happened at one tick). The staleness and
        kv-cache memos read the ages only through ``age > limit``, and every scraped endpoint had the previous
        age: a memo whose limit the age did not cross stays as it is (the owner ages the columns at every
        routing decision, and the age crosses the limit at most once per scrape)."""
        self.metrics_age[self.has_metrics] = age
        old, self._age = self._age, age
        if old is None or (self._kv_scores is not None and (old > self._kv_scores[0]) != (age > self._kv_scores[0])):
            self._kv_scores = None
        if old is None or (self._stale is not None and (old > self._stale[0]) != (age > self._stale[0])):
            self._stale = None

    def kv_scores(self, stale_after_s: float) -> np.ndarray:
        """`scorers.kv_cache` of every endpoint: 1 - KV use clamped, 0 when stale, 1 without metrics."""
        memo = self._kv_scores
        if memo is None or memo[0] != stale_after_s:
            fresh = np.minimum(1.0, np.maximum(0.0, 1.0 - self.kv_usage))
            scores = np.where(~self.has_metrics, 1.0, np.where(self.metrics_age > stale_after_s, 0.0, fresh))
            memo = self._kv_scores = (stale_after_s, scores)
        return memo[1]

    def stale(self, stale_after_s: float) -> np.ndarray:
        memo = self._stale
        if memo is None or memo[0] != stale_after_s:
            memo = self._stale = (stale_after_s, self.has_metrics & (self.metrics_age > stale_after_s))
        return memo[1]    # `EndpointView.stale`

    def uncapped_healthy(self) -> Idx | None:
        """`within_cap` when no endpoint has a concurrency cap (its result then ignores in-flight counts)."""
        if self._uncapped_idx is None and not self.cap.any():
            self._uncapped_idx = np.flatnonzero(self.healthy) if self.healthy.any() else np.arange(len(self.views))
        return self._uncapped_idx

    def cold_recorded(self, endpoint: str, clock: int) -> None:
        """The routing state stamped ``endpoint`` with ``clock`` (`RoutingState.record`): keep the mirror.
        ``clock`` is the newest stamp, so the endpoint takes the next (largest) key."""
        if self.cold_stamps is not None and self.cold_keys is not None and self.cold_clock == clock - 1:
            i = self.index.get(endpoint)
            if i is not None:
                self.cold_stamps[i] = clock
                self.cold_clock = clock
                self.cold_keys[i] = self.cold_next
                self.cold_next += 1
                if self.cold_next > 4 * len(self.views) + 16:     # renumber now and then: the count stays O(n)
                    self._renumber(self.cold_keys)

    def cold(self, served: dict[str, int], clock: int) -> tuple[np.ndarray, int]:
        """The endpoints' cold keys (see `cold_keys`) and the bound on them, as of the state's ``clock``."""
        if self.cold_stamps is None or self.cold_keys is None or self.cold_clock != clock:
            stamps = np.zeros(len(self.views), dtype=np.int64)
            index = self.index
            for e, s in served.items():
                i = index.get(e)
                if i is not None:
                    stamps[i] = s
            self.cold_stamps, self.cold_clock = stamps, clock
            self._renumber(stamps)
        assert self.cold_keys is not None
        return self.cold_keys, self.cold_next

    def _renumber(self, order: np.ndarray) -> None:
        """Keys 0..k-1: the dense ranks of ``order`` (same order, ties kept)."""
        distinct, keys = np.unique(order, return_inverse=True)
        self.cold_keys, self.cold_next = keys.astype(np.int64).reshape(-1), int(distinct.size)


def within_cap(cols: EndpointColumns) -> Idx:
    """`filters.within_cap`."""
    uncapped = cols.uncapped_healthy()
    if uncapped is not None:
        return uncapped
    kept = cols.healthy & ((cols.cap == 0) | (cols.in_flight < cols.cap))
    return np.flatnonzero(kept) if kept.any() else np.arange(len(cols.views))


ColFilter = Callable[[RouteContext, EndpointColumns, Idx], Idx]


def healthy(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> Idx:
    memo = cols._healthy_of       # health only changes with new columns: the same candidates, the same result
    if memo is None or memo[0] is not idx:
        memo = cols._healthy_of = (idx, idx[cols.healthy[idx]])
    return memo[1]


def not_overloaded(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> Idx:
    stale = cols.stale(ctx.snapshot.stale_after_s)
    memo = cols._fresh_of          # the candidates with fresh metrics, kept while the candidates and staleness are
    if memo is None or memo[0] is not idx or memo[1] is not stale:
        memo = cols._fresh_of = (idx, stale, idx[~stale[idx]])
    fresh = memo[2]
    if not fresh.size:
        fresh = idx
    loads = _at(cols.loads(), fresh)
    bound = 2.0 * float(_MIN(loads)) + OVERLOAD_SLACK
    return fresh[loads <= bound]


COL_FILTERS: dict[str, ColFilter] = {"healthy": healthy, "not-overloaded": not_overloaded}

# A scorer twin returns the scores of the candidates ``idx``; one float in [0, 1] when every candidate scores
# it (its weighted share is then added as a scalar: the same sums, and it can decide no pick); or None to
# use the Python scorer
ColScorer = Callable[[RouteContext, EndpointColumns, Idx], np.ndarray | float | None]


def _min_max_low_is_good(values: np.ndarray) -> np.ndarray:
    lo, hi = _MIN(values), _MAX(values)
    if hi == lo:
        return np.ones(values.size)
    return (hi - values) / (hi - lo)


def queue(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> np.ndarray:
    return _min_max_low_is_good(_at(cols.queue, idx))


def least_load(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> np.ndarray:
    return _min_max_low_is_good(_at(cols.loads(), idx))


def in_flight(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> np.ndarray:
    loads = _at(cols.loads(), idx)
    scores = loads + _LOAD_SOFTNESS
    return np.divide(_MIN(loads) + _LOAD_SOFTNESS, scores, out=scores)


def kv_cache(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> np.ndarray:
    return _at(cols.kv_scores(ctx.snapshot.stale_after_s), idx)


def _by_id(cols: EndpointColumns, idx: Idx, values: dict[str, int] | dict[str, float]) -> np.ndarray:
    full = np.zeros(len(cols.views))
    index = cols.index
    for e, v in values.items():
        i = index.get(e)
        if i is not None:
            full[i] = v
    return full[idx]


def prefix(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> np.ndarray | float:
    total = len(ctx.request.prefix_hashes)
    matches = ctx.approx_matches() if total else None
    if not matches:
        return 0.0
    return _by_id(cols, idx, matches) / total


def cold_spread(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> np.ndarray | float:
    if not ctx.cold():
        return 1.0
    keys, bound = cols.cold(ctx.state.cold_served, ctx.state.cold_clock)
    mine = _at(keys, idx)
    # the rank of each candidate's stamp among the candidates' distinct stamps (the Python scorer's `rank`):
    # how many distinct keys up to its own, counted over the key range, which stays O(endpoints). Counted in
    # float64 (exact below 2**53), so no pass casts booleans or integers; rank / top is then the same division
    # of two exact doubles as the Python scorer's int / int
    seen = np.zeros(bound)
    seen[mine] = 1.0
    upto = seen.cumsum()
    top = float(upto[-1]) - 1.0
    if top == 0.0:
        return 1.0
    ranks = upto[mine]
    ranks -= 1.0
    ranks /= top
    return np.subtract(1.0, ranks, out=ranks)


def prefix_spread(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> np.ndarray | float:
    roots = ctx.state.roots
    if not ctx.cold() or not roots.sharing():
        return 1.0
    return _min_max_low_is_good(_by_id(cols, idx, roots.counts()))


def session_affinity(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> np.ndarray | float:
    sess = ctx.request.session
    target = ctx.state.sessions.get(sess) if sess else None
    if target is None:
        return 0.0
    return _by_id(cols, idx, {target: 1.0})


def lora_affinity(ctx: RouteContext, cols: EndpointColumns, idx: Idx) -> float | None:
    return None if ctx.request.adapter else 1.0


# twins whose scores are within [0, 1] by construction: clamping them changes nothing, so it is skipped
BOUNDED = frozenset({"queue", "least-load", "kv-cache", "cold-spread", "prefix-spread", "session-affinity"})

COL_SCORERS: dict[str, ColScorer] = {
    "queue": queue, "least-load": least_load, "in-flight": in_flight, "kv-cache": kv_cache, "prefix": prefix,
    "cold-spread": cold_spread, "prefix-spread": prefix_spread, "session-affinity": session_affinity,
    "lora-affinity": lora_affinity,
}

ColPicker = Callable[[RouteContext, np.ndarray], int]


def max_score(ctx: RouteContext, totals: np.ndarray) -> int:
    top = (totals >= _MAX(totals) - _EPS).nonzero()[0]
    return int(top[0]) if top.size == 1 else int(top[ctx.state.rng.randrange(top.size)])


def round_robin(ctx: RouteContext, totals: np.ndarray) -> int:
    i = ctx.state.rr_counter % totals.size
    ctx.state.rr_counter += 1
    return i


COL_PICKERS: dict[str, ColPicker] = {"max-score": max_score, "round-robin": round_robin}


def runner_up(totals: np.ndarray, chosen: int) -> int:
    """The first best candidate other than ``chosen`` (as `profiles._deciding_scorer` finds it)."""
    others = totals.copy()
    others[chosen] = -np.inf
    return int(others.argmax())
