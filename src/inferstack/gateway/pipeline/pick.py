"""pick: ask the pool's router for an endpoint, and hold / release it.

Holding an endpoint counts the request in its in-flight and hands a flow-control reservation
over to it (`FlowController.routed`); releasing frees the slot and lets flow control release more.
Only a served request is a completion (`FlowController.completed`, the pool's pace); a failure or
a client's cancel frees its slot (`FlowController.freed`) without being evidence of pace.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from inferstack.gateway.datalayer import Endpoint
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pipeline.context import RequestContext
from inferstack.gateway.routing import RoutingResult


@dataclass(slots=True)
class Picked:
    endpoint: Endpoint
    result: RoutingResult
    pool: str
    metrics: GatewayMetrics
    committed: bool = False

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
    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics

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
        picked = Picked(pool.by_id(result.endpoint.id), result, pool.name, self.metrics)
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

    @staticmethod
    def release(ctx: RequestContext, ep: Endpoint) -> None:
        """The request left ``ep``: free its slot; a completion for flow control only if it was `served`."""
        ep.in_flight -= 1
        if served(ctx):
            ctx.admission.flow.completed()
        else:
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


def served(ctx: RequestContext) -> bool:
    """The client has a whole successful answer (a stream it closed after `data: [DONE]` included). A
    failure, an engine's refusal or a cancel took no service time worth measuring: counted as completions
    they would end flow control's no-evidence hold early and make the pool's pace look faster."""
    out = ctx.outcome
    return out.responded and 200 <= out.status < 300
