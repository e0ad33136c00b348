"""pick: ask the pool's router for an endpoint, wait for its room if it has none, and hold / release it.

Routing keeps its affinity; a request routed to an endpoint without room waits for THAT endpoint
(`endpointflow.EndpointQueues`, `route`). Holding an endpoint counts the request in its in-flight and
hands a flow-control reservation (the pool's, or its endpoint queue's) over to it (`FlowController.routed`);
releasing frees the slot and lets flow control release more. Only a served request is a completion
(`FlowController.completed`, the pace); a failure or a client's cancel frees its slot
(`FlowController.freed`) without being evidence of pace.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from inferstack.gateway.datalayer import Endpoint
from inferstack.gateway.endpointflow import EndpointQueues, Rerouted
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pipeline.context import RequestContext
from inferstack.gateway.routing import PoolSnapshot, RoutingResult
from inferstack.protocol.errors import APIError


@dataclass(slots=True)
class Picked:
    endpoint: Endpoint
    result: RoutingResult
    pool: str
    metrics: GatewayMetrics
    committed: bool = False
    snapshot: PoolSnapshot | None = None  # the pool as the router saw it

    def room(self) -> int:
        """The picked endpoint's room as the router saw it (`PoolSnapshot.room`): current until the task suspends."""
        assert self.snapshot is not None
        return self.snapshot.room(self.result.endpoint)

    def commit(self) -> None:
        """Record the decision: the routing state (`RoutingResult.pending`, when the pick deferred it) and
        the decisions metric. Once; later calls do nothing."""
        if self.committed:
            return
        self.committed = True
        r = self.result
        if r.pending is not None:
            r.pending()
            r.pending = None
        self.metrics.decision(self.pool, r.profile, r.reason)


class Picker:
    """``held``: each pool's endpoint queues (pools without one never wait at an endpoint)."""

    def __init__(self, metrics: GatewayMetrics, held: Mapping[str, EndpointQueues] | None = None):
        self.metrics = metrics
        self.held = held or {}

    async def route(self, ctx: RequestContext, exclude: Collection[str] = (), first: bool = True) -> Picked | None:
        """`pick` (deferred), then, on the request's ``first`` routing (not a retry), wait for the picked
        endpoint's room when it has none (`EndpointQueues.wait`). A waiter whose endpoint leaves or
        turns unhealthy is routed again without it; one whose endpoint queue refuses it (shed, full, too long
        a wait) too, while another endpoint has room now (else the refusal is raised at once: APIError 429),
        within what is left of `queue_timeout_s` since the request arrived. None: no endpoint at all. Call `hold`
        before the next suspension."""
        queues = self.held.get(ctx.route.pool.name)
        picked = self.pick(ctx, exclude, defer=True)
        if picked is None or queues is None or not first or not queues.cfg.enabled:
            return picked
        if queues.passes(picked.endpoint, ctx.caller.priority, picked.room):  # nearly every request
            return picked
        return await self._wait_for_room(ctx, queues, picked, exclude)

    async def _wait_for_room(self, ctx: RequestContext, queues: EndpointQueues, picked: Picked | None,
                             exclude: Collection[str]) -> Picked | None:
        """`route` once its pick has no room: wait at that endpoint, or route again without it."""
        adm, prio = ctx.admission, ctx.caller.priority
        skip = list(exclude)
        # the whole wait at the gateway counts, the pool's queue included (`t0` is on `perf_counter`'s clock)
        arrived = time.monotonic() - (time.perf_counter() - ctx.inbound.t0)
        deadline = arrived + queues.cfg.queue_timeout_s
        promised = arrived if adm.reserved else None  # it waited in the pool's queue: `FairQueue.admit`
        refused: APIError | None = None
        while picked is not None:
            ep = picked.endpoint
            if queues.passes(ep, prio, picked.room):
                return picked
            picked.commit()  # the decision is recorded before this task suspends (`pick`, ``defer``)
            if adm.reserved:  # routed: the pool's reservation is done with, the endpoint's queue takes over
                adm.reserved = False
                adm.flow.routed()
            try:
                waited = await queues.wait(ep, prio, adm.flow_id, adm.weight, max(0.0, deadline - time.monotonic()),
                                           promised)
            except (Rerouted, APIError) as exc:
                skip.append(ep.id)
                if isinstance(exc, APIError):
                    refused = exc
                    if not _room_elsewhere(ctx, skip):  # no other endpoint takes it now: refuse at once
                        break
                picked = self.pick(ctx, skip, defer=True)
                continue
            if waited is not None:
                adm.held_at = queues.queue(ep)
                self.metrics.endpoint_wait.labels(ctx.route.pool.name).observe(waited)
            return picked
        if refused is not None:
            self.metrics.shed.labels(ctx.route.pool.name, "shed" if prio < 0 else "queue").inc()
            raise refused
        return None

    def pick(self, ctx: RequestContext, exclude: Collection[str] = (), defer: bool = False) -> Picked | None:
        """The router's choice among the pool's endpoints not in ``exclude`` (None: no endpoint). ``defer``:
        the decision is recorded by `Picked.commit`, which the caller runs before its task next suspends
        (the proxy: right after the request is written upstream); else it is recorded here.

        The first pick routes over admission's snapshot (`Admission.snapshot`) when there is one: flow control
        let the request straight through and its task has not suspended since, so no other request ran and no
        background refresh (metrics, health) either: every field it holds is what a new snapshot would read, but
        for its clock, a few microseconds earlier. A later pick (a retry) or one with ``exclude`` builds its own."""
        pool = ctx.route.pool
        adm = ctx.admission
        snap, adm.snapshot = adm.snapshot, None
        if exclude:
            snap = pool.snapshot(frozenset(exclude))
        elif snap is None:
            snap = pool.snapshot()
        result = pool.router.route(ctx.plan.view, snap, defer)
        if result is None:
            return None
        picked = Picked(pool.by_id(result.endpoint.id), result, pool.name, self.metrics, snapshot=snap)
        if not defer:
            picked.commit()
        return picked

    @staticmethod
    def hold(ctx: RequestContext, ep: Endpoint) -> None:
        ctx.outcome.endpoint = ep.id
        ep.in_flight += 1
        adm = ctx.admission
        if adm.reserved:
            adm.reserved = False
            adm.flow.routed()
        if adm.held_at is not None:
            adm.held_at, held_at = None, adm.held_at
            held_at.routed()

    def release(self, ctx: RequestContext, ep: Endpoint) -> None:
        """The request left ``ep``: free its slot, first for the requests waiting for ``ep`` itself, then for
        the pool's queue; a completion for flow control only if it was `served`."""
        ep.in_flight -= 1
        queues = self.held.get(ctx.route.pool.name)
        if served(ctx):
            if queues is not None:
                queues.completed(ep)
            ctx.admission.flow.completed()
        else:
            if queues is not None:
                queues.freed(ep)
            ctx.admission.flow.freed()

    @staticmethod
    def succeeded(ctx: RequestContext, ep: Endpoint) -> None:
        """``ep`` served the request: reset its failure count, teach the latency model."""
        ep.request_succeeded()
        out = ctx.outcome
        if out.ttft is not None:
            ctx.route.pool.router.state.latency.observe(
                ep.id, ctx.plan.view.est_prompt_tokens, ep.in_flight + 1, out.ttft, out.tpot
            )


def _room_elsewhere(ctx: RequestContext, skip: Collection[str]) -> bool:
    """Some endpoint not in ``skip`` has room now: a request its endpoint's queue refused may go there."""
    pool = ctx.route.pool
    return pool.free_slots(pool.snapshot(frozenset(skip))) > 0


def served(ctx: RequestContext) -> bool:
    """The client has a whole successful answer (a stream it closed after `data: [DONE]` included). A
    failure, an engine's refusal or a cancel took no service time worth measuring: counted as completions
    they would end flow control's no-evidence hold early and make the pool's pace look faster."""
    out = ctx.outcome
    return out.responded and 200 <= out.status < 300
