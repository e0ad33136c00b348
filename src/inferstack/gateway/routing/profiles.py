"""Profiles (filters -> weighted scorers -> picker), profile handlers and the `Router`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np

from inferstack.gateway.routing import columns as col
from inferstack.gateway.routing import native
from inferstack.gateway.routing.filters import FILTERS, Filter, within_cap
from inferstack.gateway.routing.pickers import PICKERS, Picker
from inferstack.gateway.routing.scorers import SCORERS, UNIFORM, Scorer
from inferstack.gateway.routing.state import RouteContext, RoutingState
from inferstack.gateway.routing.types import EndpointView, PoolSnapshot, RequestView


@dataclass(slots=True)
class Pick:
    endpoint: EndpointView
    reason: str  # the scorer that decided (largest weighted margin), "tie", "only", or a policy step


class Policy(Protocol):
    name: str

    def pick(self, ctx: RouteContext, cands: list[EndpointView]) -> Pick | None: ...


@dataclass
class Profile:
    """score(e) = sum_i w_i * clamp(s_i(e), 0, 1); the picker chooses among the candidates."""

    name: str
    filters: Sequence[tuple[str, Filter]]
    scorers: Sequence[tuple[str, Scorer, float]]
    picker: Picker
    picker_name: str = ""

    def __post_init__(self) -> None:
        # worked out once, not per request: the scorers that count, and whether the columnar path applies
        self._weighted = [(n, s, w) for n, s, w in self.scorers if w != 0]
        self._uniform = [(n, s, w, UNIFORM.get(s)) for n, s, w in self._weighted]
        self._columnar = (all(f in col.COL_FILTERS for f, _ in self.filters)
                          and self.picker_name in col.COL_PICKERS)
        # the compiled pick (`routing.native`), when every step is the registry's own under its name
        own = (all(FILTERS.get(n) is f for n, f in self.filters) and PICKERS.get(self.picker_name) is self.picker
               and all(SCORERS.get(n) is s for n, s, _ in self.scorers))
        self._spec = native.spec([n for n, _ in self.filters], [(n, w) for n, _, w in self.scorers],
                                 self.picker_name) if own else None
        self._lib = native.native() if self._spec is not None else None
        self._lora = any(n == "lora-affinity" for n, _, _ in self._weighted)
        self._spread = any(n == "prefix-spread" for n, _, _ in self._weighted)

    def pick_endpoints(self, ctx: RouteContext, endpoints: Sequence[EndpointView]) -> Pick | None:
        """`pick` over ``within_cap(endpoints)``: in one compiled call when the profile has one (`routing.native`;
        the same pick, tie-break draw and reason), else the Python steps. The compiled pick reads the routing
        state only through what is passed in: the prefix matches, the cold check, the shared-prompt counts and
        the session's endpoint."""
        lib, req = self._lib, ctx.request
        if lib is None or (self._lora and req.adapter):   # lora-affinity's compiled twin: no adapter only
            return self.pick(ctx, within_cap(list(endpoints)))
        state = ctx.state
        cold = ctx.cold()
        roots, sess = state.roots, req.session
        counts = roots.counts() if cold and self._spread and roots.sharing() else None
        filters, scorers = self._spec  # type: ignore[misc]
        out = lib.pick(endpoints, filters, scorers, ctx.snapshot.stale_after_s, ctx.approx_matches(),
                       len(req.prefix_hashes), cold, state.cold_served, counts,
                       state.sessions.get(sess) if sess else None, state.rng.randrange)
        return None if out is None else Pick(endpoints[out[0]], out[1])

    def pick(self, ctx: RouteContext, cands: list[EndpointView]) -> Pick | None:
        for _, f in self.filters:
            cands = f(ctx, cands)
            if not cands:
                return None
        n = len(cands)
        if n == 1:
            return Pick(cands[0], "only")
        parts, terms = self._scores(ctx, cands)
        # endpoint by endpoint, the scorers' terms added in scorer order (the same additions as a loop over
        # scorers, so the totals are bit-identical): a quarter of the cost of a list per scorer
        totals = []
        for i in range(n):
            t = 0.0
            for w, s in terms:
                if s is None:
                    t += w
                else:
                    v = s[i]
                    t += w * (0.0 if v < 0.0 else 1.0 if v > 1.0 else v)
            totals.append(t)
        i = self.picker(ctx, cands, totals)
        return Pick(cands[i], _deciding_scorer(i, totals, parts))

    def _scores(self, ctx: RouteContext, cands: list[EndpointView]) -> tuple[list[tuple[str, float, list[float]]],
                                                                             list[tuple[float, list[float] | None]]]:
        """The scorers' lists (``parts``, for the reason) and each scorer's term in order: (weight, its list), or
        (its weighted clamped score, None) when every candidate scores the same (`scorers.UNIFORM`): the same
        float `pick` would add per candidate, with no list built; it has a zero margin, so it never decides."""
        parts: list[tuple[str, float, list[float]]] = []
        terms: list[tuple[float, list[float] | None]] = []
        for sname, scorer, weight, same in self._uniform:
            v = same(ctx) if same is not None else None
            if v is None:
                s = scorer(ctx, cands)
                parts.append((sname, weight, s))
                terms.append((weight, s))
            else:
                terms.append((weight * (0.0 if v < 0.0 else 1.0 if v > 1.0 else v), None))
        return parts, terms

    def columnar(self) -> bool:
        """Every filter and the picker have a columnar twin (`routing.columns`)."""
        return self._columnar

    def pick_columns(self, ctx: RouteContext, cols: col.EndpointColumns) -> Pick | None:
        """`pick` over ``within_cap(snapshot.endpoints)``, evaluated over the snapshot's columns (same
        decision, tie-break draw and reason; only when `columnar`)."""
        idx = col.within_cap(cols)
        for name, _ in self.filters:
            idx = col.COL_FILTERS[name](ctx, cols, idx)
            if not idx.size:
                return None
        views = cols.views
        if idx.size == 1:
            return Pick(views[idx[0]], "only")
        totals, parts = self._totals_columns(ctx, cols, idx)
        i = col.COL_PICKERS[self.picker_name](ctx, totals)
        return Pick(views[idx[i]], _deciding_scorer_columns(i, totals, parts))

    def _totals_columns(self, ctx: RouteContext, cols: col.EndpointColumns,
                        idx: col.Idx) -> tuple[np.ndarray, list[tuple[str, float, np.ndarray]]]:
        """Every candidate's total, the scorers' terms added in scorer order, as `pick` adds them, and the
        scorers' columns (``parts``, for the reason). A score that is the same everywhere is one float: added
        to the one float all totals start from (``lead``) while no column came yet, else to every total
        (adding 0.0 changes no value, so it is skipped); a weight of 1 multiplies nothing. Each total is
        the same sum of the same doubles in the same order as a row of per-scorer columns."""
        lead = 0.0
        totals: np.ndarray | None = None
        parts: list[tuple[str, float, np.ndarray]] = []
        cands: list[EndpointView] | None = None
        for sname, scorer, weight in self._weighted:
            twin = col.COL_SCORERS.get(sname)
            s = twin(ctx, cols, idx) if twin is not None else None
            if isinstance(s, float):
                # a zero margin over every runner-up, so it never decides (`_deciding_scorer` needs a positive one)
                if totals is None:
                    lead += weight * s
                elif weight * s != 0.0:
                    totals += weight * s
                continue
            bounded = s is not None and sname in col.BOUNDED
            if s is None:     # no twin for this scorer or this request: the Python scorer
                cands = cands if cands is not None else [cols.views[j] for j in idx]
                s = np.asarray(scorer(ctx, cands), dtype=np.float64)
            parts.append((sname, weight, s))
            term = s if bounded else np.minimum(np.maximum(s, 0.0), 1.0)    # `s` stays as it is, for the reason
            if weight != 1.0:
                term = np.multiply(term, weight, out=None if term is s else term)
            if totals is None:
                totals = term + lead        # a new array: ``term`` may be a scorer's kept column
            else:
                totals += term
        if totals is None:
            totals = np.full(idx.size, lead)
        return totals, parts


def _deciding_scorer(chosen: int, totals: list[float], parts: list[tuple[str, float, list[float]]]) -> str:
    """The scorer with the largest weighted margin of the chosen endpoint over the runner-up."""
    # the first best of the others (as max() over them would pick), found at C speed: routing runs
    # this for every request over every endpoint
    if len(totals) == 2:    # the other one (most pools are small)
        runner = 1 - chosen
    else:
        others = totals[:chosen] + totals[chosen + 1:]
        runner = others.index(max(others))
        runner += runner >= chosen
    if abs(totals[chosen] - totals[runner]) < 1e-9:
        return "tie"
    best_name, best_margin = "tie", 0.0
    for name, w, s in parts:
        margin = w * (s[chosen] - s[runner])
        if margin > best_margin:
            best_name, best_margin = name, margin
    return best_name


def _deciding_scorer_columns(chosen: int, totals: np.ndarray, parts: list[tuple[str, float, np.ndarray]]) -> str:
    """`_deciding_scorer` over arrays."""
    runner = col.runner_up(totals, chosen)
    if abs(float(totals[chosen]) - float(totals[runner])) < 1e-9:
        return "tie"
    best_name, best_margin = "tie", 0.0
    for name, w, s in parts:
        margin = w * (float(s[chosen]) - float(s[runner]))
        if margin > best_margin:
            best_name, best_margin = name, margin
    return best_name


@dataclass
class CacheAware:
    """SGLang / vllm-router `cache_aware`: balance by in-flight load when the load is imbalanced
    (abs and rel thresholds), else route to the longest prefix match above `cache_threshold`,
    else to the least-loaded endpoint (ties to the lowest index, as upstream)."""

    name: str = "cache-aware"
    cache_threshold: float = 0.3
    balance_abs_threshold: float = 64
    balance_rel_threshold: float = 1.5

    def pick(self, ctx: RouteContext, cands: list[EndpointView]) -> Pick | None:
        cands = [e for e in cands if e.healthy]
        if not cands:
            return None
        loads = [e.in_flight for e in cands]
        lo, hi = min(loads), max(loads)
        least = loads.index(lo)
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            return Pick(cands[least], "balance")
        m = ctx.approx_matches()
        if m and ctx.request.prompt_chars:
            best = max(range(len(cands)), key=lambda i: m.get(cands[i].id, 0))
            matched_chars = m.get(cands[best].id, 0) * ctx.state.block_chars
            if min(1.0, matched_chars / ctx.request.prompt_chars) > self.cache_threshold:
                return Pick(cands[best], "prefix")
        return Pick(cands[least], "least-load")


class ProfileHandler(Protocol):
    def profiles(self, req: RequestView, snap: PoolSnapshot) -> Sequence[tuple[str, Policy]]:
        """(role, policy) pairs to run for this request; the first role is the primary pick."""
        ...


@dataclass
class SingleProfile:
    policy: Policy

    def profiles(self, req: RequestView, snap: PoolSnapshot) -> Sequence[tuple[str, Policy]]:
        return (("primary", self.policy),)


@dataclass(slots=True)
class RoutingResult:
    endpoint: EndpointView
    profile: str
    reason: str
    others: dict[str, EndpointView] = field(default_factory=dict)  # extra roles (e.g. prefill)
    # `Router.route(defer=True)`: the decision's record in the routing state, for the caller to run
    pending: Callable[[], None] | None = None


@dataclass
class Router:
    handler: ProfileHandler
    state: RoutingState

    def columnar(self) -> bool:
        """Every pick can run over a snapshot's columns (`Profile.pick_columns`)."""
        h = self.handler
        return isinstance(h, SingleProfile) and isinstance(h.policy, Profile) and h.policy.columnar()

    def route(self, req: RequestView, snap: PoolSnapshot, defer: bool = False) -> RoutingResult | None:
        """Pick endpoints for ``req`` and record the decision in the routing state. ``defer``: a one-profile
        pick leaves its record to the caller (`RoutingResult.pending`), who runs it before its task next
        suspends, so no other decision sees the state without it (the HTTP gateway: once the request is
        written upstream, so the record is off a lone request's latency). With several profiles a later
        pick reads an earlier one's record: recorded at once."""
        ctx = RouteContext(req, snap, self.state)
        cold = ctx.cold()
        result: RoutingResult | None = None
        cols = snap.columns
        roles = self.handler.profiles(req, snap)
        defer = defer and len(roles) == 1
        for role, policy in roles:
            if cols is not None and isinstance(policy, Profile) and policy.columnar():
                pick = policy.pick_columns(ctx, cols)
            else:
                pick = policy.pick_endpoints(ctx, snap.endpoints) if isinstance(policy, Profile) \
                    else policy.pick(ctx, within_cap(list(snap.endpoints)))
            if pick is None:
                if result is None:
                    return None
                continue
            if result is None:
                result = RoutingResult(pick.endpoint, policy.name, pick.reason)
            else:
                result.others[role] = pick.endpoint
            if defer:
                result.pending = partial(self._record, req, pick.endpoint.id, cold, cols)
            else:
                self._record(req, pick.endpoint.id, cold, cols)
        return result

    def _record(self, req: RequestView, endpoint: str, cold: bool, cols: col.EndpointColumns | None) -> None:
        self.state.record(req, endpoint, cold)
        if cold and cols is not None:
            cols.cold_recorded(endpoint, self.state.cold_clock)
