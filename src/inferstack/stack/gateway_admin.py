"""Tell the gateway which endpoints are in the pool, so a crashed replica is out until it is back.

Desired-state and idempotent: the supervisor always sends the full list of ready endpoints
(`PUT /admin/pools/{pool}/endpoints`), never add/remove deltas that could be lost or reordered.
A gateway without the hook answers 404/405: then the supervisor relies on the gateway's own health
checks and restarts replicas on their old port so the URL the gateway knows stays valid.
The admin API needs a bearer token: the supervisor generates one per stack and hands it to the
gateway in its environment (`gateway.admin_token_env`) and to this hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

ADMIN_PATH = "/admin/pools/{pool}/endpoints"


@dataclass(frozen=True)
class PoolEndpoint:
    """One endpoint as the gateway's admin API takes it (the gateway learns models from /v1/models)."""

    url: str
    name: str
    kv_events: str | None = None       # `up.kv_reuse`: what the engine reported in its ready file
    kv_transfer: str | None = None


class PoolHook:
    def __init__(self, gateway_url: str, client: httpx.AsyncClient, pool: str = "default",
                 token: str | None = None) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.pool = pool
        self.client = client
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.supported: bool | None = None   # unknown until the first call

    async def set_endpoints(self, endpoints: list[PoolEndpoint]) -> bool:
        """Replace the pool's endpoint list; False when the gateway has no hook or is unreachable."""
        if self.supported is False:
            return False
        body = {"endpoints": [{k: v for k, v in vars(e).items() if v is not None} for e in endpoints]}
        try:
            r = await self.client.put(self.gateway_url + ADMIN_PATH.format(pool=self.pool), json=body,
                                      headers=self.headers, timeout=5.0)
        except httpx.HTTPError as e:
            log.warning("gateway pool update failed: %s", e)
            return False
        if r.status_code in (404, 405):
            self.supported = False
            return False
        if r.status_code >= 400:
            log.warning("gateway rejected pool update (%s): %s", r.status_code, r.text[:300])
            return False
        self.supported = True
        return True
