"""Prefill/decode disaggregation policy (llm-d's PD profile handler plus its prefix-based decider).

Pure policy over a `PoolSnapshot`: the decode profile always runs (over endpoints whose role is
`decode` or `both`; a `both` engine has no PD connector, so picking one means colocated); the
decider then looks at how much of the prompt the chosen decode endpoint
already caches, and only when enough tokens are uncached does the prefill profile run (over
`prefill` endpoints). The proxy turns a result with a prefill pick into two legs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from inferstack.gateway.routing.filters import within_cap
from inferstack.gateway.routing.profiles import Pick, Policy, Router, RoutingResult
from inferstack.gateway.routing.state import RouteContext, RoutingState
from inferstack.gateway.routing.types import EndpointView, PoolSnapshot, RequestView

ROLES = ("prefill", "decode", "both")
# Characters per token when the request was not tokenized (GIE / llm-d estimate).
_CHARS_PER_TOKEN = 4


class Outcome(StrEnum):
    """Why a request was (or was not) split; the label of `inferstack_gateway_pd_decisions`."""

    REMOTE = "remote_prefill"          # prefill leg on a prefill endpoint, then decode
    CACHED = "local_cached"            # few uncached tokens on the decode endpoint: colocated
    NO_PREFILL = "local_no_prefill"    # no healthy prefill endpoint: colocated on the decode endpoint
    NO_DECODE = "local_no_decode"      # no healthy decode endpoint: colocated on a prefill endpoint
    PREFILL_BUSY = "local_prefill_busy"  # every prefill endpoint's queue is at max_prefill_queue
    BOTH = "local_both"                # the decode profile chose a `both` endpoint (no PD connector)


def decide(uncached_tokens: int, threshold: int, prefill_available: bool, prefill_busy: bool = False) -> Outcome:
    """Remote prefill pays a second queue and a KV transfer; it is worth it only for prompts with
    at least ``threshold`` tokens the decode endpoint would otherwise compute (0: always), and —
    with conditional disaggregation — only while some prefill endpoint's queue is short."""
    if uncached_tokens < threshold:
        return Outcome.CACHED
    if not prefill_available:
        return Outcome.NO_PREFILL
    if prefill_busy:
        return Outcome.PREFILL_BUSY
    return Outcome.REMOTE


def prefill_busy(snap: PoolSnapshot, roles: Mapping[str, str], max_queue: int | None) -> bool:
    """Every healthy prefill endpoint has at least ``max_queue`` requests waiting (None: never busy)."""
    if max_queue is None:
        return False
    queues = [e.queue for e in snap.endpoints if e.healthy and roles.get(e.id) == "prefill"]
    return bool(queues) and min(queues) >= max_queue


def uncached_tokens(ctx: RouteContext, endpoint: str, block_size: int) -> tuple[int, int]:
    """(prompt tokens, tokens of the prompt ``endpoint`` does not cache), from the precise index
    when the request was tokenized, else from the approximate index (chars / 4)."""
    req = ctx.request
    if req.token_hashes:
        cached = int(ctx.precise_matches(list(ctx.snapshot.endpoints)).get(endpoint, 0.0) * block_size)
        total = max(req.est_prompt_tokens, len(req.token_hashes) * block_size)
    else:
        blocks = ctx.approx_matches().get(endpoint, 0)
        cached = blocks * ctx.state.block_chars // _CHARS_PER_TOKEN
        total = req.est_prompt_tokens
    return total, max(0, total - cached)


def pd_free_slots(snap: PoolSnapshot, roles: Mapping[str, str], conditional: bool = False) -> int:
    """Flow control of a PD pool: a split request occupies a decode endpoint *and* a prefill
    endpoint, so the pool has room only while both sides do. Without this, saturated prefill
    engines queue without bound behind free decode engines and nothing is ever shed. When no
    prefill endpoint is healthy, or with conditional disaggregation (busy prefill endpoints send
    the prefill to the decode side), the decode side alone counts."""
    decode = snap.free_slots(lambda e: roles.get(e.id, "both") != "prefill")
    if conditional or not any(e.healthy and roles.get(e.id) == "prefill" for e in snap.endpoints):
        return decode
    return min(decode, snap.free_slots(lambda e: roles.get(e.id) == "prefill"))


@dataclass(slots=True)
class PDResult(RoutingResult):
    """`endpoint` serves the client (decode leg); `others["prefill"]` is set when the request is split."""

    outcome: Outcome = Outcome.CACHED
    prompt_tokens: int = 0
    uncached: int = 0


@dataclass
class _RolePolicy:
    """A policy restricted to endpoints with some roles."""

    policy: Policy
    roles: Mapping[str, str]
    allowed: frozenset[str]

    @property
    def name(self) -> str:
        return self.policy.name

    def pick(self, ctx: RouteContext, cands: list[EndpointView]) -> Pick | None:
        kept = within_cap([e for e in cands if self.roles.get(e.id, "both") in self.allowed])
        return self.policy.pick(ctx, kept) if kept else None


class PDRouter(Router):
    """Router for a pool with endpoint roles. ``roles`` maps endpoint id -> prefill|decode|both
    (absent: both)."""

    def __init__(self, decode: Policy, prefill: Policy, roles: Mapping[str, str], threshold_tokens: int,
                 state: RoutingState, block_size: int = 16, max_prefill_queue: int | None = None):
        super().__init__(handler=None, state=state)  # type: ignore[arg-type]  # route() is overridden
        self.roles = dict(roles)
        self.decode = _RolePolicy(decode, self.roles, frozenset({"decode", "both"}))
        self.prefill = _RolePolicy(prefill, self.roles, frozenset({"prefill"}))
        self.colocated = _RolePolicy(decode, self.roles, frozenset(ROLES))
        self.threshold = threshold_tokens
        self.block_size = block_size
        self.max_prefill_queue = max_prefill_queue

    def route(self, req: RequestView, snap: PoolSnapshot, defer: bool = False) -> PDResult | None:
        """The decode pick, then the prefill pick when the request is split; recorded at once whatever
        ``defer`` says (the prefill pick reads the decode pick's record)."""
        ctx = RouteContext(req, snap, self.state)
        cold = ctx.cold()
        eps = list(snap.endpoints)
        pick = self.decode.pick(ctx, eps)
        if pick is None:
            # degraded: a prefill engine can still serve a whole request itself
            pick = self.colocated.pick(ctx, eps)
            if pick is None:
                return None
            total, uncached = uncached_tokens(ctx, pick.endpoint.id, self.block_size)
            self.state.record(req, pick.endpoint.id, cold)
            return PDResult(pick.endpoint, self.decode.name, pick.reason, outcome=Outcome.NO_DECODE,
                            prompt_tokens=total, uncached=uncached)
        total, uncached = uncached_tokens(ctx, pick.endpoint.id, self.block_size)
        result = PDResult(pick.endpoint, self.decode.name, pick.reason, prompt_tokens=total, uncached=uncached)
        self.state.record(req, pick.endpoint.id, cold)
        if self.roles.get(pick.endpoint.id, "both") == "both":
            result.outcome = Outcome.BOTH
            return result
        prefill = self.prefill.pick(ctx, eps) if uncached >= self.threshold else None
        result.outcome = decide(uncached, self.threshold, prefill is not None,
                                prefill_busy(snap, self.roles, self.max_prefill_queue))
        if result.outcome is Outcome.REMOTE and prefill is not None:
            result.others["prefill"] = prefill.endpoint
            self.state.record(req, prefill.endpoint.id, False)
        return result


def build_pd_router(decode_profile: str, prefill_profile: str, roles: Mapping[str, str], threshold_tokens: int,
                    state: RoutingState, custom: Mapping[str, tuple[list[str], Mapping[str, float], str]] | None = None,
                    block_size: int = 16, max_prefill_queue: int | None = None) -> PDRouter:
    """A `PDRouter` from profile names (presets or custom profiles, as `build_router`)."""
    from inferstack.gateway.routing.registry import build_policy

    return PDRouter(build_policy(decode_profile, custom), build_policy(prefill_profile, custom), roles,
                    threshold_tokens, state, block_size, max_prefill_queue)
