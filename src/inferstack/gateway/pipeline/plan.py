"""plan: rewrite the body for the engine (model, cache_salt, priority, stream usage; a client's
`kv_transfer_params` dropped), serialize it once, and build the routing view (prefix hashes,
precise KV hashes when the pool is tokenized)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from inferstack.config.schema import GatewayConfig
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.gateway.datalayer import Endpoint, Pool
from inferstack.gateway.pipeline.context import Caller, EngineBody, Plan, Route
from inferstack.gateway.requests import PromptFacts, encode_request, session_key, set_gateway_fields
from inferstack.gateway.routing import RequestView
from inferstack.gateway.routing.prefix import PrefixHasher

RETRYABLE = (aiohttp.ClientError, TimeoutError, OSError)


class Planner:
    def __init__(self, gw: GatewayConfig):
        self.hasher = PrefixHasher(gw.prefix_index.block_chars, gw.prefix_index.max_blocks)

    @staticmethod
    def engine_body(req: dict[str, Any], caller: Caller, route: Route) -> EngineBody:
        """Rewrite ``req`` into the engine's body (the parsed request is not needed afterwards) and
        serialize it; raises APIError(400) for a body that cannot be serialized."""
        set_gateway_fields(req, model=route.upstream_model, salt=caller.salt, priority=caller.priority)
        stream = req.get("stream") is True
        inject_usage = False
        if stream:
            so = req.get("stream_options")
            if not (isinstance(so, dict) and so.get("include_usage")):
                inject_usage = True
                req["stream_options"] = (
                    {**so, "include_usage": True} if isinstance(so, dict) else {"include_usage": True}
                )
        return EngineBody(encode_request(req), stream, inject_usage)

    async def plan(self, kind: str, req: dict[str, Any], body: EngineBody, facts: PromptFacts, caller: Caller,
                   route: Route, session_header: bytes | None) -> Plan:
        """The routing view of an admitted request (precise KV hashes ask an engine's /tokenize)."""
        plan = self.plan_now(req, body, facts, caller, route, session_header)
        if route.pool.config.precise_prefix is not None:
            plan.view.token_hashes = await token_hashes(route.pool, kind, req, caller.salt)
        return plan

    def plan_now(self, req: dict[str, Any], body: EngineBody, facts: PromptFacts, caller: Caller, route: Route,
                 session_header: bytes | None) -> Plan:
        """`plan` for a pool without precise prefix routing (nothing to wait for: no coroutine per request)."""
        view = RequestView(
            route.upstream_model,
            self.hasher.hashes(facts.parts, route.upstream_model + "\x00" + caller.salt),
            (), facts.chars, route.adapter, session_key(req, session_header), caller.priority,
            facts.max_tokens or 64)
        return Plan(body.payload, body.stream, body.inject_usage, view)


async def token_hashes(pool: Pool, kind: str, req: dict, salt: str) -> list[bytes]:
    """Tokenize through an endpoint's /tokenize (the engine applies its chat template), then hash
    blocks exactly as the engines do (docs/kv-cache.md). A second healthy endpoint is asked when the
    first does not answer (it may have died since the last health check); failures fall back to the
    approximate index."""
    pp = pool.config.precise_prefix
    if pp is None:
        return []
    q: dict[str, Any] = {"model": req["model"]}
    if kind == "chat":
        q["messages"] = req.get("messages")
    else:
        q["prompt"] = req.get("prompt")
    for ep in [e for e in pool.endpoints if e.healthy][:2]:
        tokens = await _tokenize(ep, q)
        if tokens is not None:
            space = KVKeySpace(pp.model_digest, pp.dtype, pp.kv_layout, pp.block_size)
            return space.hashes(tokens, salt)
    return []


async def _tokenize(ep: Endpoint, q: dict[str, Any]) -> list[int] | None:
    try:
        async with ep.session.post("/tokenize", data=orjson.dumps(q), headers=_tokenize_headers(ep),
                                   timeout=aiohttp.ClientTimeout(total=2.0)) as r:
            if r.status != 200:
                return None
            return orjson.loads(await r.read()).get("tokens") or []
    except (*RETRYABLE, orjson.JSONDecodeError, AttributeError):
        return None


def _tokenize_headers(ep: Endpoint) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if ep.api_key:
        h["authorization"] = f"Bearer {ep.api_key}"
    return h
