"""Pickers choose one endpoint from the scored candidates."""

from __future__ import annotations

from collections.abc import Callable

from inferstack.gateway.routing.state import RouteContext
from inferstack.gateway.routing.types import EndpointView

Picker = Callable[[RouteContext, list[EndpointView], list[float]], int]

_EPS = 1e-9


def max_score(ctx: RouteContext, cands: list[EndpointView], scores: list[float]) -> int:
    """Highest total score; ties broken uniformly at random (never by position)."""
    best = max(scores)
    top = [i for i, s in enumerate(scores) if s >= best - _EPS]
    return top[0] if len(top) == 1 else top[ctx.state.rng.randrange(len(top))]


def weighted_random(ctx: RouteContext, cands: list[EndpointView], scores: list[float]) -> int:
    """Probability proportional to score (uniform if every score is 0)."""
    total = sum(scores)
    if total <= 0:
        return ctx.state.rng.randrange(len(cands))
    r = ctx.state.rng.random() * total
    acc = 0.0
    for i, s in enumerate(scores):
        acc += s
        if r < acc:
            return i
    return len(scores) - 1


def power_of_two(ctx: RouteContext, cands: list[EndpointView], scores: list[float]) -> int:
    """Two distinct random candidates; the higher score wins."""
    n = len(cands)
    if n == 1:
        return 0
    a, b = ctx.state.rng.sample(range(n), 2)
    return a if scores[a] >= scores[b] else b


def round_robin(ctx: RouteContext, cands: list[EndpointView], scores: list[float]) -> int:
    i = ctx.state.rr_counter % len(cands)
    ctx.state.rr_counter += 1
    return i


PICKERS: dict[str, Picker] = {
    "max-score": max_score,
    "weighted-random": weighted_random,
    "power-of-two": power_of_two,
    "round-robin": round_robin,
}
