"""Per-pool routing memory (prefix indexes, latency model, affinities). Pure data, no I/O:
the caller feeds it decisions, completions and KV events."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

from inferstack.gateway.routing.latency import LatencyModel
from inferstack.gateway.routing.prefix import ApproxPrefixIndex, PreciseIndex
from inferstack.gateway.routing.roots import ReusedRoots
from inferstack.gateway.routing.types import EndpointView, PoolSnapshot, RequestView

_MAX_SESSIONS = 100_000


@dataclass
class RoutingState:
    block_chars: int = 64
    approx: ApproxPrefixIndex = field(default_factory=ApproxPrefixIndex)
    precise: PreciseIndex = field(default_factory=PreciseIndex)
    latency: LatencyModel = field(default_factory=LatencyModel)
    rng: random.Random = field(default_factory=random.Random)
    rr_counter: int = 0
    # when each endpoint last received a request that hit no cache anywhere (llm-d no-hit LRU)
    cold_served: dict[str, int] = field(default_factory=dict)
    cold_clock: int = 0
    sessions: OrderedDict[str, str] = field(default_factory=OrderedDict)
    adapters_seen: dict[str, OrderedDict[str, None]] = field(default_factory=dict)
    roots: ReusedRoots = field(default_factory=ReusedRoots)  # the shared prompts each endpoint keeps warm

    def record(self, req: RequestView, endpoint: str, cold: bool) -> None:
        """Remember where a request went (prefix LRU, cold LRU, session and adapter affinity)."""
        if req.prefix_hashes:
            self.approx.insert(endpoint, req.prefix_hashes)
            self.roots.record(endpoint, req.prefix_hashes[0])
        if cold:
            self.cold_clock += 1
            self.cold_served[endpoint] = self.cold_clock
        if req.session:
            self.sessions[req.session] = endpoint
            self.sessions.move_to_end(req.session)
            if len(self.sessions) > _MAX_SESSIONS:
                self.sessions.popitem(last=False)
        if req.adapter:
            seen = self.adapters_seen.setdefault(endpoint, OrderedDict())
            seen[req.adapter] = None
            seen.move_to_end(req.adapter)
            if len(seen) > 64:
                seen.popitem(last=False)

    def forget_endpoint(self, endpoint: str) -> None:
        """The endpoint left the pool: drop everything remembered about it."""
        self.approx.remove_endpoint(endpoint)
        self.precise.cleared(endpoint)
        self.latency.ttft.pop(endpoint, None)
        self.latency.tpot.pop(endpoint, None)
        self.cold_served.pop(endpoint, None)
        self.adapters_seen.pop(endpoint, None)
        self.roots.forget(endpoint)


class RouteContext:
    """One routing decision's inputs, with lazily computed shared intermediate results."""

    __slots__ = ("_approx", "_cold", "_precise", "request", "snapshot", "state")

    def __init__(self, request: RequestView, snapshot: PoolSnapshot, state: RoutingState):
        self.request = request
        self.snapshot = snapshot
        self.state = state
        self._approx: dict[str, int] | None = None
        self._precise: dict[str, float] | None = None
        self._cold: bool | None = None

    def approx_matches(self) -> dict[str, int]:
        if self._approx is None:
            self._approx = self.state.approx.match(self.request.prefix_hashes) if self.request.prefix_hashes else {}
        return self._approx

    def precise_matches(self, endpoints: list[EndpointView]) -> dict[str, float]:
        if self._precise is None:
            hashes = self.request.token_hashes
            self._precise = {e.id: self.state.precise.match(e.id, hashes) for e in endpoints} if hashes else {}
        return self._precise

    def cold(self) -> bool:
        """No endpoint holds any of this request's prefix (asked by the router and two scorers per pick; it
        reads only the matches, which are kept, so it is worked out once)."""
        if self._cold is None:
            self._cold = not (self.request.token_hashes and any(
                v > 0 for v in self.precise_matches(list(self.snapshot.endpoints)).values())) \
                and not self.approx_matches()
        return self._cold
