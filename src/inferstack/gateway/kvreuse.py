"""Cross-replica KV reads: name, in the chosen engine's request, a replica that holds more of the
prompt's leading blocks, so that the engine READs them over NIXL instead of recomputing them.

The precise prefix index (KV events) says which engine holds which blocks in its paged cache. When
the routed endpoint holds fewer leading blocks of the prompt than another endpoint with a KV transfer
address (``kv_transfer``), the request gains ``kv_transfer_params`` naming that holder, signed with the
stack's transfer secret like a prefill engine's PD params (``engine/connector/peers.py``): an engine
pulls only from signed params, so no client can point it elsewhere. The engine asks the holder for
its own prompt's block hashes; whatever the holder no longer has, the engine loads from its KV tiers
or recomputes (docs/disaggregation.md, "Cross-replica reads").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from inferstack.engine.connector.peers import TransferTrust
from inferstack.gateway.datalayer import Endpoint, Pool
from inferstack.gateway.routing.state import RoutingState

SECRET_ENV = "INFERSTACK_KV_TRANSFER_SECRET"


def pick_holder(pool: Pool, state: RoutingState, chosen: Endpoint, hashes: Sequence[bytes],
                min_blocks: int) -> tuple[Endpoint, int] | None:
    """The endpoint holding the most leading blocks beyond ``chosen``'s (by at least ``min_blocks``),
    with its count; None when ``chosen`` is as good as any holder that can be read from."""
    if not hashes:
        return None
    have = state.precise.leading(chosen.id, hashes)
    best: tuple[Endpoint, int] | None = None
    for ep in pool.endpoints:
        if ep is chosen or not ep.kv_transfer or not ep.healthy:
            continue
        n = state.precise.leading(ep.id, hashes)
        if n - have >= min_blocks and (best is None or n > best[1]):
            best = (ep, n)
    return best


class DirectReads:
    def __init__(self, registry: CollectorRegistry, secret: str | None = None) -> None:
        secret = secret if secret is not None else os.environ.get(SECRET_ENV)
        self.trust = TransferTrust.from_config((), secret) if secret else None
        self.decisions = Counter("inferstack_gateway_kv_direct_reads",
                                 "Requests sent with another replica named as the holder of their prefix, "
                                 "to READ it over NIXL (outcome: direct), or routed where no replica held more "
                                 "(none).", ("pool", "outcome"), registry=registry)

    def payload(self, pool: Pool, chosen: Endpoint, payload: bytes, rid: bytes, hashes: Sequence[bytes]) -> bytes:
        """``payload``, or the same request naming the replica to READ its prefix from."""
        pp = pool.config.precise_prefix
        if self.trust is None or pp is None or not pp.direct_reads or not chosen.kv_transfer:
            return payload
        found = pick_holder(pool, pool.router.state, chosen, hashes, pp.direct_min_blocks)
        if found is None:
            self.decisions.labels(pool.name, "none").inc()
            return payload
        holder, blocks = found
        host, _, port = holder.kv_transfer.rpartition(":")     # type: ignore[union-attr]
        req: dict[str, Any] = orjson.loads(payload)
        req["kv_transfer_params"] = self.trust.sign({
            "do_remote_prefill": True, "kv_reuse": True, "remote_host": host, "remote_port": int(port),
            "remote_request_id": rid.decode("latin-1"), "remote_num_blocks": blocks})
        self.decisions.labels(pool.name, "direct").inc()
        return orjson.dumps(req)
