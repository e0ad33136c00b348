"""The gateway in virtual time: the live gateway's router (`datalayer.pool_router`: every preset, custom
profiles, the PD decider), its endpoint views and its flow control (`gateway.flowqueue`, the live policy
itself: the pool's queue over the endpoints' positive rooms, and a queue per endpoint for requests routed to
one without room, as `gateway.endpointflow` holds them), over simulated replicas instead of HTTP endpoints.

What the live gateway scrapes from each engine's /metrics every ``scrape_interval_s`` the simulator
reads from the replica's scheduler at the first routing decision after each scrape tick (so values
are at most one interval old, as live); the gateway's own counters (in flight) are always exact.
KV events reach the precise prefix index at the end of each engine step, as the engine flushes them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial

from inferstack.config.schema import InferstackConfig, PoolConfig
from inferstack.engine.kv.events import KVEvent, KVEventBatch
from inferstack.gateway.datalayer import pool_router
from inferstack.gateway.flowqueue import FairQueue
from inferstack.gateway.kvevents import apply_batch
from inferstack.gateway.requests import prompt_parts
from inferstack.gateway.routing import EndpointView, PoolSnapshot, RequestView, RoutingResult
from inferstack.gateway.routing.columns import EndpointColumns
from inferstack.gateway.routing.disagg import PDRouter, pd_free_slots
from inferstack.gateway.routing.prefix import text_prefix_hashes
from inferstack.gateway.routing.state import RoutingState
from inferstack.gateway.routing.types import UNBOUNDED
from inferstack.sim.replica import SimReplica


@dataclass(eq=False)
class SimEndpoint:
    replica: SimReplica
    view: EndpointView
    scraped_tick: int = -1
    draining: bool = False
    id: str = field(init=False)      # the view's (read several times a request: an attribute, not a property)

    def __post_init__(self) -> None:
        self.id = self.view.id


class SimGateway:
    def __init__(self, cfg: InferstackConfig, pool: PoolConfig, replicas: list[SimReplica], seed: int,
                 columnar: bool = True) -> None:
        self.cfg, self.pool = cfg, pool
        gw = cfg.gateway
        custom = {n: (p.filters, p.scorers, p.picker) for n, p in cfg.routing.profiles.items()}
        self.state = RoutingState(rng=random.Random(seed))
        self.router = pool_router(pool, gw, [r.id for r in replicas], self.state, custom)
        # route over numpy columns of the endpoints (`routing.columns`: same decisions, C speed)
        self.columnar = columnar and self.router.columnar() and self._room_exact()
        self._holds = not isinstance(self.router, PDRouter)      # the router is the pool's for the whole run
        self._views_aged = False
        self.endpoints: dict[str, SimEndpoint] = {}
        self.order: list[SimEndpoint] = []
        self.version = 0
        self._snap: PoolSnapshot | None = None
        self._snap_key: tuple[int, int] = (-1, -1)
        # flow control's free slots = the sum of the endpoints' positive rooms (the sum of their rooms in a
        # prefill/decode pool, `Pool.free_slots`), kept current as in-flight counts move
        # (O(1) per request instead of O(endpoints)); recomputed whenever the snapshot is rebuilt
        self._room_total = 0
        self._room_key: tuple[int, int] | None = None
        self._aged_key: tuple[int, int] | None = None
        for r in replicas:
            self.add(r)
        self.now = 0.0
        # the live gateway's flow-control policy itself, on the simulation's clock
        self.admission: FairQueue[object] = FairQueue(gw.flow_control, self.free_slots, now=lambda: self.now)
        # requests routed to an endpoint without room wait for it (`gateway.endpointflow`), by endpoint id
        self.holds: dict[str, FairQueue[object]] = {}
        tenant = cfg.tenants.get(gw.default_tenant)
        self.salt = (tenant.cache_salt or gw.default_tenant) if tenant else gw.default_tenant
        self.tenant_weight = tenant.weight if tenant else 1.0
        self.precise = pool.precise_prefix is not None
        self.decisions: dict[str, int] = {}

    def add(self, replica: SimReplica) -> SimEndpoint:
        ep = SimEndpoint(replica, EndpointView(replica.id, max_concurrency=self.pool.max_concurrency))
        self.endpoints[replica.id] = ep
        self.order.append(ep)
        self.changed()
        if isinstance(self.router, PDRouter):
            self.router.roles[replica.id] = replica.role
        return ep

    def remove(self, ep: SimEndpoint) -> None:
        self.order.remove(ep)
        del self.endpoints[ep.id]
        self.changed()
        self.state.forget_endpoint(ep.id)

    def snapshot(self, exclude: frozenset[str] = frozenset()) -> PoolSnapshot:
        """The pool as the router sees it now. Rebuilt once per scrape tick or membership/health change
        (views are live objects: the gateway's in-flight counts are always current)."""
        now, gw = self.now, self.cfg.gateway
        tick = int(now / gw.scrape_interval_s)
        key = (tick, self.version)
        if self._snap is None or self._snap_key != key:
            self._snap, self._snap_key = self._build_snapshot(tick), key
            self._aged_key = None
        snap = self._snap
        if snap.now != now or self._aged_key != key:      # flow control and routing ask at the same instant
            snap.now = now
            self._age(snap, now - tick * gw.scrape_interval_s)
            self._aged_key = key
        if exclude:
            if snap.columns is not None and not self._views_aged:
                self._age_views(snap, now - tick * gw.scrape_interval_s)
            return PoolSnapshot([v for v in snap.endpoints if v.id not in exclude], now, snap.stale_after_s,
                                snap.queue_threshold, snap.kv_threshold)
        return snap

    def _age(self, snap: PoolSnapshot, age: float) -> None:
        """Scrapes are ``age`` old. With columns only they age (at C speed); the views age when a
        Python path reads them (`_room_exact` holds, so flow control's room does not depend on the age)."""
        cols = snap.columns
        if cols is None:
            self._age_views(snap, age)
        else:
            cols.set_age(age)
            self._views_aged = False

    def _age_views(self, snap: PoolSnapshot, age: float) -> None:
        for v in snap.endpoints:
            if v.has_metrics:
                v.metrics_age_s = age
        self._views_aged = True

    def _build_snapshot(self, tick: int) -> PoolSnapshot:
        views = []
        age = self.now - tick * self.cfg.gateway.scrape_interval_s
        for ep in self.order:
            v = ep.view
            if ep.scraped_tick != tick and ep.replica.up:
                v.queue, v.running, v.kv_usage = ep.replica.snapshot_metrics()
                v.batch_cap = ep.replica.scheduler.config.max_num_seqs  # `inferstack:max_num_seqs`, as live
                v.has_metrics = True
                ep.scraped_tick = tick
            if v.has_metrics:
                v.metrics_age_s = age
            v.healthy = ep.replica.up and not ep.draining
            views.append(v)
        gw = self.cfg.gateway
        fc = gw.flow_control
        self._views_aged = True
        return PoolSnapshot(views, self.now, gw.metrics_stale_s, fc.queue_threshold, fc.kv_threshold,
                            EndpointColumns.of(views) if self.columnar else None)

    def changed(self) -> None:
        """An endpoint joined, left, crashed, restarted or started draining."""
        self.version += 1

    def free_slots(self) -> int:
        snap = self.snapshot()
        if not self.holds_at_endpoints():
            return pd_free_slots(snap, self.router.roles, conditional=self.router.max_prefill_queue is not None)
        if not self._room_exact():
            return snap.free_slots(positive=True)
        if self._room_key != self._snap_key:
            self._room_total = sum(max(0, snap.room(e)) for e in snap.endpoints)
            self._room_key = self._snap_key
        return min(UNBOUNDED, self._room_total)

    def holds_at_endpoints(self) -> bool:
        """`Pool.holds_at_endpoints`: every pool but a prefill/decode one."""
        return self._holds

    def hold_queue(self, ep: SimEndpoint) -> FairQueue[object]:
        """``ep``'s queue of requests routed to it while it had no room (the live `EndpointQueues.queue`)."""
        q = self.holds.get(ep.id)
        if q is None:
            q = self.holds[ep.id] = FairQueue(self.cfg.gateway.flow_control, partial(self.room, ep),
                                              now=lambda: self.now)
        return q

    def room(self, ep: SimEndpoint) -> int:
        """Requests ``ep`` may take now (`PoolSnapshot.room`; with columns the views' ages may lag, which
        `_room_exact` makes irrelevant to the room)."""
        return self.snapshot().room(ep.view)

    def room_elsewhere(self, exclude: frozenset[str]) -> bool:
        """An endpoint not in ``exclude`` has room now (`pick._room_elsewhere`)."""
        return self.snapshot(exclude).free_slots(positive=True) > 0

    def shift_held(self, ep: SimEndpoint, delta: int) -> None:
        """Change ``ep``'s count of requests held for it (the router sees it in the endpoint's load)."""
        ep.view.held += delta
        snap = self._snap
        if snap is not None and snap.columns is not None:
            snap.columns.shift_held(ep.id, ep.view.held)

    def _room_exact(self) -> bool:
        """Between snapshot rebuilds an endpoint's room changes only with its in-flight count, as long as
        a scrape's age cannot cross `has_live_metrics`' limit (at least 2 s) within one interval."""
        return self.cfg.gateway.scrape_interval_s <= 2.0

    def shift(self, ep: SimEndpoint, delta: int) -> None:
        """Change the gateway's in-flight count of ``ep`` (and the pool's room with it)."""
        snap = self._snap
        tracked = self._room_key is not None and self._room_key == self._snap_key and snap is not None \
            and self.endpoints.get(ep.id) is ep
        before = max(0, snap.room(ep.view)) if tracked else 0      # type: ignore[union-attr]
        ep.view.in_flight += delta
        if snap is not None and snap.columns is not None:
            snap.columns.shift(ep.id, ep.view.in_flight)
        if tracked:
            self._room_total += max(0, snap.room(ep.view)) - before   # type: ignore[union-attr]

    def request_view(self, messages: list[tuple[str, str]], priority: int, max_tokens: int, session: str | None,
                     model: str) -> RequestView:
        """What the live gateway computes from a chat body (`server.py`): the approximate prefix chain
        over the same prompt parts, seeded by model and cache salt."""
        body = {"messages": [{"role": r, "content": c} for r, c in messages]}
        parts = list(prompt_parts("chat", body))
        pi = self.cfg.gateway.prefix_index
        return RequestView(model=model, prefix_hashes=text_prefix_hashes(parts, model + "\x00" + self.salt,
                                                                         pi.block_chars, pi.max_blocks),
                           prompt_chars=sum(map(len, parts)), session=session, priority=priority,
                           max_tokens=max_tokens)

    def route(self, view: RequestView, exclude: frozenset[str]) -> RoutingResult | None:
        result = self.router.route(view, self.snapshot(exclude))
        if result is not None:
            key = f"{result.profile}/{result.reason}"
            self.decisions[key] = self.decisions.get(key, 0) + 1
        return result

    def kv_events(self, endpoint: str, events: list[KVEvent]) -> None:
        if events:
            apply_batch(self.state, endpoint, KVEventBatch(self.now, events))
