"""Scorers: each maps the candidates to scores in [0, 1] (higher is better)."""

from __future__ import annotations

from collections.abc import Callable

from inferstack.gateway.routing.state import RouteContext
from inferstack.gateway.routing.types import EndpointView

Scorer = Callable[[RouteContext, list[EndpointView]], list[float]]
# The score a scorer gives every candidate alike, known from the request and the routing state alone (before
# looking at the candidates); None when the candidates may differ. `Profile.pick` adds such a score as one number
# instead of calling the scorer for a list of equal values (most requests: no adapter, no session, a prompt
# some endpoint holds).
Uniform = Callable[[RouteContext], float | None]

# Softness of the in-flight scorer: (min + K) / (load + K). With K = 4 one extra request on an
# idle endpoint costs 0.2, while at 40 vs 44 in flight the gap is under 0.1, so prefix affinity
# survives small imbalances but not large ones.
_LOAD_SOFTNESS = 4.0


def _unit(v: float) -> float:
    """min(1.0, max(0.0, v)), the same value (NaN: 0.0) without the builtins' argument parsing (per request)."""
    v = v if v > 0.0 else 0.0
    return v if v < 1.0 else 1.0


def _min_max_low_is_good(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


def queue(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """GIE queue-scorer: min-max over the engines' waiting queues."""
    return _min_max_low_is_good([e.queue for e in cands])


def running(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    return _min_max_low_is_good([e.running for e in cands])


def kv_cache(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """1 - KV use; stale metrics score 0, endpoints without KV metrics are neutral (1)."""
    stale = ctx.snapshot.stale_after_s
    return [1.0 if not e.has_metrics else 0.0 if e.stale(stale) else _unit(1.0 - e.kv_usage) for e in cands]


def in_flight(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """Smooth least-load: (min_load + K) / (load + K) over the gateway's own in-flight counts
    (fresh on every request, unlike scraped metrics) or the engine's, whichever is larger."""
    loads = [e.load() for e in cands]
    lo = min(loads)
    return [(lo + _LOAD_SOFTNESS) / (v + _LOAD_SOFTNESS) for v in loads]


def least_load(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """Strict least-load: min-max over load."""
    return _min_max_low_is_good([e.load() for e in cands])


def _prefix_same(ctx: RouteContext) -> float | None:
    return 0.0 if not ctx.request.prefix_hashes or not ctx.approx_matches() else None


def prefix(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """Approximate prefix hit: matched blocks / request blocks (GIE's prefix-cache-scorer)."""
    same = _prefix_same(ctx)
    if same is not None:
        return [same] * len(cands)
    m = ctx.approx_matches()
    total = len(ctx.request.prefix_hashes)
    return [m.get(e.id, 0) / total for e in cands]


def precise_prefix(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """Precise prefix hit from KV events, tier-weighted, over the request's block hashes."""
    total = len(ctx.request.token_hashes)
    if not total:
        return prefix(ctx, cands)  # not tokenized: fall back to the approximate index
    m = ctx.precise_matches(cands)
    return [min(1.0, m.get(e.id, 0.0) / total) for e in cands]


def _warm_neutral(ctx: RouteContext) -> float | None:
    return None if ctx.cold() else 1.0


def cold_spread(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """For requests nobody has cached, prefer the endpoint that least recently got such a
    request, so an idle fleet fills its caches evenly instead of piling onto one endpoint.
    Neutral (all 1) for requests with a cache hit somewhere."""
    same = _warm_neutral(ctx)
    if same is not None:
        return [same] * len(cands)
    served = ctx.state.cold_served
    stamps = [served.get(e.id, 0) for e in cands]
    order = sorted(set(stamps))
    if len(order) == 1:
        return [1.0] * len(cands)
    rank = {s: i for i, s in enumerate(order)}
    top = len(order) - 1
    return [1.0 - rank[s] / top for s in stamps]


def _prefix_spread_same(ctx: RouteContext) -> float | None:
    return 1.0 if not ctx.cold() or not ctx.state.roots.sharing() else None


def prefix_spread(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """For requests nobody has cached, prefer the endpoints that keep the fewest prompts warm
    (`roots.ReusedRoots`; min-max, so one prompt more decides): an engine's prefix cache holds a bounded
    number of them, and the one sent more than it holds evicts its rarest again and again. Neutral for
    requests with a cache hit somewhere and while no prompt is shared."""
    same = _prefix_spread_same(ctx)
    if same is not None:
        return [same] * len(cands)
    counts = ctx.state.roots.counts()
    return _min_max_low_is_good([counts.get(e.id, 0) for e in cands])


def _session_same(ctx: RouteContext) -> float | None:
    sess = ctx.request.session
    return 0.0 if not sess or sess not in ctx.state.sessions else None   # no endpoint is the session's


def session_affinity(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    same = _session_same(ctx)
    if same is not None:
        return [same] * len(cands)
    target = ctx.state.sessions[ctx.request.session]
    return [1.0 if e.id == target else 0.0 for e in cands]


def _lora_same(ctx: RouteContext) -> float | None:
    return None if ctx.request.adapter else 1.0


def lora_affinity(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """GIE: 1.0 adapter active, 0.8 room to load, 0.6 waiting to load, else 0. Endpoints that
    export no adapter metrics are judged by which adapters this gateway sent them lately."""
    same = _lora_same(ctx)
    if same is not None:
        return [same] * len(cands)
    adapter = ctx.request.adapter
    out = []
    for e in cands:
        if adapter in e.adapters_active:
            out.append(1.0)
        elif e.max_lora and len(e.adapters_active) + len(e.adapters_waiting) < e.max_lora:
            out.append(0.8)
        elif adapter in e.adapters_waiting:
            out.append(0.6)
        elif not e.max_lora and adapter in ctx.state.adapters_seen.get(e.id, ()):
            out.append(1.0)
        elif not e.max_lora:
            out.append(0.5)
        else:
            out.append(0.0)
    return out


def predicted_latency(ctx: RouteContext, cands: list[EndpointView]) -> list[float]:
    """min predicted latency / this endpoint's: TTFT (cached prefix tokens discounted) plus TPOT
    times the request's output budget (capped at 256 tokens)."""
    req = ctx.request
    total_blocks = len(req.prefix_hashes) or 1
    m = ctx.approx_matches()
    model = ctx.state.latency
    preds = []
    for e in cands:
        share = m.get(e.id, 0) / total_blocks
        cached = share if share < 1.0 else 1.0
        uncached = req.est_prompt_tokens * (1.0 - cached)
        preds.append(model.predict_ttft(e.id, uncached, e.load())
                     + model.predict_tpot(e.id) * min(req.max_tokens, 256))
    best = min(preds)
    return [best / p for p in preds]


SCORERS: dict[str, Scorer] = {
    "queue": queue,
    "running": running,
    "kv-cache": kv_cache,
    "in-flight": in_flight,
    "least-load": least_load,
    "prefix": prefix,
    "precise-prefix": precise_prefix,
    "cold-spread": cold_spread,
    "prefix-spread": prefix_spread,
    "session-affinity": session_affinity,
    "lora-affinity": lora_affinity,
    "predicted-latency": predicted_latency,
}

# `Uniform` checks of the scorers above, by function (a custom scorer under one of these names has none)
UNIFORM: dict[Scorer, Uniform] = {
    prefix: _prefix_same, cold_spread: _warm_neutral, prefix_spread: _prefix_spread_same,
    session_affinity: _session_same, lora_affinity: _lora_same,
}
