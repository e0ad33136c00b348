"""Kubernetes discovery → the datalayer: pools with `kubernetes:` get their endpoint set from the
pods (src/inferstack/kube/watch.py) through the same `DataLayer.set_endpoints` the admin API uses,
and their PD roles from the pods' `llm-d.ai/role` labels."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from inferstack.config.schema import EndpointConfig
from inferstack.gateway.routing.disagg import PDRouter
from inferstack.kube.client import make_client, stop_all
from inferstack.kube.pods import DiscoveredEndpoint
from inferstack.kube.watch import DiscoveryState, PoolDiscovery

if TYPE_CHECKING:
    from lightkube import AsyncClient

    from inferstack.gateway.datalayer import DataLayer, Pool

log = logging.getLogger("inferstack.gateway")


class KubeDiscovery:
    """One PoolDiscovery per pool with `kubernetes:`; ``start`` waits (briefly) for each first list
    so a gateway that can reach the API serves its pods from the first request."""

    def __init__(self, datalayer: DataLayer, backoff_cap_s: float = 10.0):
        self.datalayer = datalayer
        self.backoff_cap_s = backoff_cap_s
        self.pools: dict[str, PoolDiscovery] = {}
        self._clients: list[AsyncClient] = []
        self._tasks: list[asyncio.Task] = []

    async def start(self, first_list_wait_s: float = 5.0) -> None:
        for pool in self.datalayer.pools:
            cfg = pool.config.kubernetes
            if cfg is None:
                continue
            client = make_client(pool.name, cfg)
            self._clients.append(client)
            disc = PoolDiscovery(pool.name, cfg, client, lambda eps, _p=pool: self.apply(_p, eps),
                                 self.backoff_cap_s)
            self.pools[pool.name] = disc
            self._tasks.append(asyncio.create_task(disc.run(), name=f"kube-discovery-{pool.name}"))
        waits = [asyncio.wait_for(d.first_attempt.wait(), first_list_wait_s) for d in self.pools.values()]
        for r in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(r, TimeoutError):
                log.warning("Kubernetes discovery: no answer from the API server within %.0fs; "
                            "serving with no endpoints until it answers", first_list_wait_s)

    def status(self) -> dict[str, DiscoveryState]:
        return {name: d.state for name, d in self.pools.items()}

    def synced(self) -> bool:
        """Every discovered pool has listed its pods at least once (the EPP's readiness needs this)."""
        return all(d.state.synced for d in self.pools.values())

    async def apply(self, pool: Pool, endpoints: tuple[DiscoveredEndpoint, ...]) -> None:
        """Make ``pool``'s endpoints exactly ``endpoints`` (ids are podIP:port, as GIE names them)."""
        roles = {urlsplit(e.url).netloc: e.role for e in endpoints}
        pd_roles = pool.router.roles if isinstance(pool.router, PDRouter) else None
        if pd_roles is not None:
            pd_roles.update(roles)  # before the endpoints appear, so a new pod is never routed as `both`
        await self.datalayer.set_endpoints(pool, [self.endpoint_config(pool, e) for e in endpoints])
        if pd_roles is not None:
            for gone in set(pd_roles) - set(roles):
                del pd_roles[gone]
        log.info("pool %s: %d endpoint(s) from Kubernetes", pool.name, len(endpoints))

    @staticmethod
    def endpoint_config(pool: Pool, e: DiscoveredEndpoint) -> EndpointConfig:
        """The pod's endpoint, with its KV events and KV transfer address on the pool's ports when set."""
        cfg = pool.config.kubernetes
        host = urlsplit(e.url).hostname
        events = f"tcp://{host}:{cfg.kv_events_port}" if cfg is not None and cfg.kv_events_port else None
        transfer = f"{host}:{cfg.kv_transfer_port}" if cfg is not None and cfg.kv_transfer_port else None
        return EndpointConfig(url=e.url, role=e.role, kv_events=events, kv_transfer=transfer)

    async def stop(self) -> None:
        await stop_all(self._tasks, self._clients)
