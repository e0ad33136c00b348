"""The request pipeline shared by the HTTP gateway and the Envoy endpoint picker:

    authenticate -> parse -> resolve -> spill -> hold -> admit -> plan -> pick -> [proxy | answer Envoy] -> account

`Pipeline` owns the state every stage reads (pools and their data layer, flow control, limits,
metrics, audit, tracing) and runs the stages up to admission in `start`; the front end (HTTP
`Gateway` or `epp` picker) then picks, serves and calls `close`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from inferstack.autoscale.load import LoadSnapshot
from inferstack.autoscale.metrics import AutoscalerCollector, AutoscalerStatus
from inferstack.autoscale.signals import Objectives
from inferstack.compliance.audit import AuditLog
from inferstack.config.schema import InferstackConfig
from inferstack.gateway.auth import Identity, KeyStore
from inferstack.gateway.datalayer import DataLayer, Pool
from inferstack.gateway.endpointflow import EndpointQueues
from inferstack.gateway.flowcontrol import FlowController
from inferstack.gateway.limits import Limiter, Limits, MemoryLimiter, RedisLimiter
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pipeline.account import Accountant
from inferstack.gateway.pipeline.admit import Admitter
from inferstack.gateway.pipeline.authenticate import Authenticator
from inferstack.gateway.pipeline.context import Caller, Inbound, RequestContext, RequestIds, Route, Tenant
from inferstack.gateway.pipeline.hold import ClientGone, Hold, HoldMetrics
from inferstack.gateway.pipeline.parse import parse_body, requested_model
from inferstack.gateway.pipeline.pick import Picker
from inferstack.gateway.pipeline.plan import Planner
from inferstack.gateway.pipeline.resolve import Resolver
from inferstack.gateway.pipeline.spill import Spiller
from inferstack.gateway.poolload import PoolLoad
from inferstack.gateway.requests import prompt_facts
from inferstack.gateway.routing.disagg import PDRouter
from inferstack.protocol.errors import APIError

if TYPE_CHECKING:
    from inferstack.gateway.kubescale import KubeAutoscalers


class Pipeline:
    """``tracer_provider`` (OpenTelemetry) is optional; without one no spans are made. ``rng`` seeds every
    random choice of routing (tie-breaks, power-of-two, model resolution); None: seeded from the OS."""

    def __init__(self, cfg: InferstackConfig, tracer_provider: Any = None, limiter: Limiter | None = None,
                 rng: random.Random | None = None):
        self.cfg = cfg
        gw = cfg.gateway
        rng = rng or random.Random()
        custom = {n: (p.filters, p.scorers, p.picker) for n, p in cfg.routing.profiles.items()}
        self.pools = {name: Pool.from_config(name, p, gw, custom, random.Random(rng.getrandbits(64)))
                      for name, p in cfg.pools.items()}
        self.metrics = GatewayMetrics()
        self.request_ids = RequestIds()  # for requests that bring no x-request-id (`Inbound.arrive`)
        self.metrics.track_in_flight(
            lambda: [(p.name, e.id, e.in_flight) for p in self.pools.values() for e in p.endpoints])
        self.flow = {name: FlowController(gw.flow_control, pool.free_slots, self._depth_gauge(name),
                                          prior=pool.engines_pace, engines_full=pool.engines_full)
                     for name, pool in self.pools.items()}
        # requests routed to an endpoint without room wait for it (gateway/endpointflow.py)
        self.held = {name: EndpointQueues(gw.flow_control, pool, partial(self._set_depth, name),
                                          partial(self.metrics.set_endpoint_held, name))
                     for name, pool in self.pools.items() if pool.holds_at_endpoints()}
        self.limiter: Limiter = limiter or (
            RedisLimiter(gw.redis_url, timeout_s=gw.limits.store_timeout_s, retry_s=gw.limits.store_retry_s)
            if gw.redis_url else MemoryLimiter())
        # scale from zero (pipeline/hold.py) and what autoscalers read and report (docs/autoscaling.md)
        hold_metrics = HoldMetrics(self.metrics.registry)
        self.holds = {name: Hold(pool, cfg.pools[name].scale_from_zero, hold_metrics)
                      for name, pool in self.pools.items() if cfg.pools[name].scale_from_zero is not None}
        self.loads = {name: PoolLoad() for name in self.pools}
        self.autoscalers: dict[tuple[str, str], AutoscalerStatus] = {}
        self.metrics.registry.register(AutoscalerCollector(lambda: list(self.autoscalers.values())))
        self.datalayer = DataLayer(list(self.pools.values()), gw, on_refresh=self._refreshed)
        # the writer's health metrics go on our /metrics
        self.audit = (AuditLog(cfg.audit, registry=self.metrics.registry)
                      if cfg.audit is not None and cfg.audit.enabled else None)
        self.tracer = (
            tracer_provider.get_tracer("inferstack.gateway") if tracer_provider is not None else None
        )
        self.keys = KeyStore(cfg)
        tenants = {
            n: Tenant(Limits(t.rpm, t.tpm), t.cache_salt or n, t.weight, t.local_only)
            for n, t in cfg.tenants.items()
        }
        self.auth = Authenticator(self.keys, tenants)
        self.resolver = Resolver(cfg, self.pools, random.Random(rng.getrandbits(64)))
        self.spiller = Spiller(self.pools, self.flow, self.metrics)
        self.admitter = Admitter(self.limiter, self.flow, self.metrics, gw.limits, self.audit)
        self.planner = Planner(gw)
        self.picker = Picker(self.metrics, self.held)
        self.account = Accountant(self.metrics, self.limiter, self.audit)
        self.kube_autoscalers: KubeAutoscalers | None = None  # started by `open` for `kubernetes.autoscale` pools
        # whether this replica acts on the cluster (the EPP sets its leader elector's view before `open`)
        self.leading: Callable[[], bool] = lambda: True

    def _refreshed(self, pool: Pool) -> None:
        if pool.name in self.held:  # what waits for an endpoint was routed earlier: it goes first
            self.held[pool.name].pump()
        self.flow[pool.name].pump()
        if pool.name in self.holds:
            self.holds[pool.name].pump()

    def _depth_gauge(self, pool: str):
        return lambda prio, _depth: self._set_depth(pool, prio)

    def _set_depth(self, pool: str, prio: int) -> None:
        """`inferstack_gateway_queue_depth`: the pool's queue and its endpoints' queues, per priority."""
        held = self.held.get(pool)
        depth = self.flow[pool].queue.depth(prio) + (held.depth(prio) if held is not None else 0)
        self.metrics.queue_depth.labels(pool, str(prio)).set(depth)

    async def open(self) -> None:
        await self.datalayer.start()
        self._start_autoscalers()

    def _start_autoscalers(self) -> None:
        """Pools with `kubernetes.autoscale`: scale their Deployments from here (gateway/kubescale.py)."""
        scaled = {n: p for n, p in self.pools.items()
                  if p.config.kubernetes is not None and p.config.kubernetes.autoscale is not None}
        if not scaled:
            return
        from inferstack.gateway.kubescale import KubeAutoscalers  # loads the Kubernetes client only when used
        from inferstack.kube.client import make_client

        self.kube_autoscalers = KubeAutoscalers()
        for name, pool in scaled.items():
            kube = pool.config.kubernetes
            self.kube_autoscalers.start(name, partial(self.pool_load, name), kube.autoscale,
                                   make_client(name, kube), kube.namespace, self.leading, self.report_autoscaler)

    async def aclose(self) -> None:
        if self.kube_autoscalers is not None:
            await self.kube_autoscalers.stop()
        await self.datalayer.stop()
        await self.limiter.close()
        if self.audit is not None:
            await self.audit.aclose()  # flushes every queued record to disk

    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """None when ready to serve, else why not."""
        if self.audit is not None and not self.audit.admits_requests:
            return f"audit log cannot write: {self.audit.failure}"
        # a pool that scales from zero takes requests with no endpoint: it holds them for a replica
        if not self.holds and not any(e.healthy for p in self.pools.values() for e in p.endpoints):
            return "no healthy endpoint"
        return None

    def pool_load(self, pool: str, since: float, objectives: Objectives | None = None) -> LoadSnapshot:
        """The pool's load for autoscalers (`GET /admin/pools/{pool}/load` and the Kubernetes actuator)."""
        hold, p = self.holds.get(pool), self.pools[pool]
        roles = p.router.roles if isinstance(p.router, PDRouter) else None
        held = self.held.get(pool)
        queued = self.flow[pool].queued + (held.queued if held is not None else 0)
        return self.loads[pool].snapshot(p, since, hold.held if hold else 0, queued, roles, objectives)

    def report_autoscaler(self, status: AutoscalerStatus) -> None:
        """An actuator's newest status (`PUT /admin/pools/{pool}/autoscaler`), exported as metrics."""
        self.autoscalers[(status.pool, status.role)] = status

    async def start(self, inbound: Inbound, body: bytes, caller: Caller | None = None,
                    client_gone: asyncio.Future | None = None) -> RequestContext:
        """Run authenticate (unless ``caller`` came from an earlier headers phase), parse, resolve,
        hold (a pool scaling from zero; ``client_gone`` ends the wait), admit and plan. A refusal is
        audited here and raised as APIError; a client gone while held raises `hold.ClientGone`."""
        ident: Identity | None = caller.ident if caller else None
        model: str | None = None
        try:
            if caller is None:
                caller = self.auth.authenticate(inbound.headers)
                ident = caller.ident
            req = parse_body(body)
            model = requested_model(req)
            self.auth.authorize(caller, model)
            local = self.resolver.resolve(model)
            self.loads[local.pool.name].arrived()  # demand on the local pool, spilled or not
            route = self.spiller.divert(local, caller)
            if route.pool is not local.pool:
                self.loads[local.pool.name].spilled_over()
            facts = prompt_facts(inbound.kind, req, self.cfg.gateway.http.max_prompts)
            out_tokens = facts.max_tokens or self.cfg.gateway.limits.default_max_tokens
            engine_body = self.planner.engine_body(req, caller, route)
            hold = self.holds.get(route.pool.name)
            if hold is not None:
                await hold.wait(inbound.headers, client_gone)
            admission = await self.admitter.admit(inbound, caller, route, facts.prompt_tokens,
                                                  facts.prompt_tokens + out_tokens * facts.fan_out, client_gone)
        except APIError as exc:
            await self.account.rejected(inbound, ident, model, exc)
            raise
        except ClientGone:
            await self.account.rejected(inbound, ident, model, APIError(499, "Client disconnected while waiting."))
            raise
        session = inbound.headers.get(b"x-session-id")
        if route.pool.config.precise_prefix is None:
            plan = self.planner.plan_now(req, engine_body, facts, caller, route, session)
        else:  # plan awaited /tokenize: admission's snapshot is stale
            plan = await self.planner.plan(inbound.kind, req, engine_body, facts, caller, route, session)
            admission.snapshot = None
        return RequestContext(
            inbound, caller, req, route, admission, plan, span=self._span(inbound, caller, route)
        )

    async def close(self, ctx: RequestContext) -> None:
        """The request is over: give back a reservation it never used; `account` settles TPM, ends
        the span and audits."""
        adm = ctx.admission
        if adm.reserved:
            adm.reserved = False
            adm.flow.routed()
        if adm.held_at is not None:  # released by its endpoint's queue, never routed there
            adm.held_at, held_at = None, adm.held_at
            held_at.routed()
        await self.account.close(ctx)
        out = ctx.outcome
        self.loads[ctx.route.pool.name].finished_request(out.ttft, out.tpot, out.in_tokens, out.out_tokens)

    def _span(self, inbound: Inbound, caller: Caller, route: Route) -> Any:
        if self.tracer is None:
            return None
        op = "chat" if inbound.kind == "chat" else "text_completion"
        return self.tracer.start_span(
            f"{op} {route.model}",
            attributes={
                "gen_ai.operation.name": op,
                "gen_ai.request.model": route.model,
                "inferstack.pool": route.pool.name,
                "inferstack.tenant": caller.ident.tenant,
                "inferstack.request_id": inbound.rid.decode("latin-1"),
                "inferstack.priority": caller.priority,
            },
        )
