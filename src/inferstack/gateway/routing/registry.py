"""Names of filters, scorers, pickers and the presets built from them."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from inferstack.gateway.routing.filters import FILTERS
from inferstack.gateway.routing.pickers import PICKERS
from inferstack.gateway.routing.profiles import CacheAware, Policy, Profile, Router, SingleProfile
from inferstack.gateway.routing.scorers import SCORERS
from inferstack.gateway.routing.state import RoutingState


def make_profile(name: str, filters: list[str], scorers: Mapping[str, float], picker: str) -> Profile:
    return Profile(
        name=name,
        filters=[(f, FILTERS[f]) for f in filters],
        scorers=[(s, SCORERS[s], float(w)) for s, w in scorers.items()],
        picker=PICKERS[picker],
        picker_name=picker,
    )


def _default() -> Policy:
    # Ours: GIE's signals plus a smooth in-flight load term (fresh, not 50 ms old) and the
    # no-hit spreader, so an idle fleet spreads distinct prefixes while shared prefixes stick
    # until their holder is overloaded relative to the rest of the pool. A new shared prompt goes where the
    # fewest shared prompts live (prefix-spread; 1.5: one more outweighs a moderate load gap, not a large
    # one), so no engine is sent more than its cache holds while another has room (docs/gateway.md, "Presets").
    return make_profile("default", ["healthy", "not-overloaded"],
                        {"prefix": 3, "in-flight": 2, "kv-cache": 1, "cold-spread": 1, "prefix-spread": 1.5,
                         "lora-affinity": 2, "session-affinity": 2}, "max-score")


PRESETS: dict[str, Callable[[], Policy]] = {
    "default": _default,
    "gie": lambda: make_profile("gie", ["healthy"], {"queue": 2, "kv-cache": 2, "prefix": 3}, "max-score"),
    "cache-aware": CacheAware,
    "least-load": lambda: make_profile("least-load", ["healthy"], {"least-load": 1}, "max-score"),
    "round-robin": lambda: make_profile("round-robin", ["healthy"], {}, "round-robin"),
    "power-of-two": lambda: make_profile("power-of-two", ["healthy"], {"least-load": 1}, "power-of-two"),
    "latency": lambda: make_profile("latency", ["healthy", "not-saturated"],
                                    {"predicted-latency": 3, "prefix": 1, "in-flight": 1}, "max-score"),
}


def build_policy(name: str, custom: Mapping[str, tuple[list[str], Mapping[str, float], str]] | None = None) -> Policy:
    """A preset by name, or a custom profile given as (filters, scorers, picker)."""
    if custom and name in custom:
        filters, scorers, picker = custom[name]
        return make_profile(name, list(filters), scorers, picker)
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown routing profile {name!r}; presets: {', '.join(sorted(PRESETS))}") from None


def build_router(name: str = "default", state: RoutingState | None = None,
                 custom: Mapping[str, tuple[list[str], Mapping[str, float], str]] | None = None) -> Router:
    return Router(SingleProfile(build_policy(name, custom)), state or RoutingState())


__all__ = ["FILTERS", "PICKERS", "PRESETS", "SCORERS", "build_policy", "build_router"]
