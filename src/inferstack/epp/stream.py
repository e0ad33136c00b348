"""One ext_proc stream (= one HTTP request through Envoy) run through the gateway pipeline.

Request headers: authenticate (refuse at once), read the subset hint. Request body end-of-stream:
parse, resolve, admit, plan and pick, then answer Envoy: in FULL_DUPLEX_STREAMED mode the headers
response (destination header + ``envoy.lb`` metadata, route cache cleared) is deferred until
then and the rewritten body follows as streamed chunks; in BUFFERED mode the headers were answered
at once and the body response carries the routing mutation. Response headers and body: status,
served endpoint, TTFT/ITL and usage, echoed back; at the end, accounting and audit.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry, Histogram

from inferstack.epp import messages as m
from inferstack.gateway.datalayer import Endpoint, Pool
from inferstack.gateway.kvreuse import DirectReads
from inferstack.gateway.pd import PDLegs
from inferstack.gateway.pipeline import Caller, Inbound, Pipeline, RequestContext
from inferstack.gateway.pipeline.context import KINDS
from inferstack.gateway.pipeline.usage import StreamMeter, json_usage
from inferstack.gateway.routing.disagg import PDResult
from inferstack.protocol.errors import APIError, internal_error

log = logging.getLogger("inferstack.epp")

_STREAMED = ProcessingMode.FULL_DUPLEX_STREAMED
_DECISION_BUCKETS = (
    0.0001,
    0.0002,
    0.0003,
    0.0004,
    0.0005,
    0.0006,
    0.0008,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    5.0,
    30.0,
)


def decision_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "inferstack_epp_decision_seconds",
        "Picker decision time: request end-of-stream in to routing response out (includes "
        "flow-control queueing; excludes the body's transfer).",
        buckets=_DECISION_BUCKETS,
        registry=registry,
    )


def address(ep: Endpoint) -> str:
    """The ``ip:port`` Envoy's ORIGINAL_DST cluster connects to."""
    return urlsplit(ep.url).netloc


_RESPONSE_MESSAGES = frozenset({"response_headers", "response_body", "response_trailers"})


class Phase(enum.Enum):
    HEADERS = 0  # waiting for request headers
    BODY = 1  # collecting the request body
    UPSTREAM = 2  # picked; waiting for the response
    RESPONSE = 3  # relaying the response body
    DONE = 4


@dataclass
class EndpointPicker:
    """What every stream shares: the pipeline, the pool this picker serves and its options."""

    pipeline: Pipeline
    pool: Pool
    conformance: bool = False
    decisions: Histogram | None = None
    pd: PDLegs | None = None            # prefill legs of PD pools (gateway/pd.py, shared with the gateway)
    reads: DirectReads | None = None    # cross-replica KV reads (gateway/kvreuse.py, shared with the gateway)
    fallbacks: int = 0                  # epp.fallback_endpoints

    def endpoint_at(self, addr: str) -> Endpoint | None:
        return next((e for e in self.pool.endpoints if address(e) == addr), None)


@dataclass
class _Response:
    status: int = 0
    sse: bool = False
    meter: StreamMeter | None = None
    buffered: list[bytes] = field(default_factory=list)


class Stream:
    def __init__(self, picker: EndpointPicker):
        self.p = picker
        self.phase = Phase.HEADERS
        self.request_mode = _STREAMED
        self.response_mode = _STREAMED
        self.inbound: Inbound | None = None
        self.caller: Caller | None = None
        self.hint: list[str] | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.ctx: RequestContext | None = None
        self.held: Endpoint | None = None
        self.passthrough = False
        self.resp = _Response()

    async def handle(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """The responses to send for one message, in order (possibly none yet)."""
        if msg.HasField("protocol_config"):
            self.request_mode = msg.protocol_config.request_body_mode or _STREAMED
            self.response_mode = msg.protocol_config.response_body_mode
        which = msg.WhichOneof("request")
        if which == "request_headers":
            return await self._request_headers(msg)
        if which == "request_body":
            return await self._request_body(msg.request_body)
        if which == "request_trailers":
            out = [] if self.phase is not Phase.BODY else await self._decide(end_of_stream=False)
            return [*out, pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
        if which == "response_headers":
            return await self._response_headers(msg)
        if which == "response_body":
            return await self._response_body(msg.response_body)
        if which == "response_trailers":
            await self.finish()
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        return []

    async def failed(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """The answer to ``msg`` after `handle` raised (a picker bug, never a client's fault), so Envoy
        never turns the broken stream into a bare 500 (docs/kubernetes.md, "Failure modes"). Before the
        upstream answered: a 500 OpenAI envelope (``internal_error``, the request id) as the immediate
        response, the request's endpoint and flow-control slot given back. Once the response runs: the
        engine's answer passes through untouched (no more metering), so the client keeps what it was
        being served; only this request's accounting is lost."""
        rid = self.inbound.rid if self.inbound else None
        which = msg.WhichOneof("request")
        log.exception("request %s: the picker failed on %s", (rid or b"-").decode("latin-1"), which)
        response_side = self.phase is Phase.RESPONSE or which in _RESPONSE_MESSAGES
        self.resp.status = self.resp.status or 500
        try:
            await self.abandon()
        except Exception:  # the books are lost for this request; the client still gets an answer
            log.exception("request %s: settling after the failure failed too", (rid or b"-").decode("latin-1"))
        self.phase = Phase.DONE
        if not response_side:
            return [m.immediate(internal_error(rid.decode("latin-1") if rid else None), rid)]
        if which == "response_body":
            return self._echo(msg.response_body.body, msg.response_body.end_of_stream)
        if which == "response_trailers":
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        return [pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse()))]

    # ---- request -------------------------------------------------------------------------------
    async def _request_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        headers = m.headers_of(msg.request_headers)
        self.hint = m.subset_hint(msg)
        if self.p.conformance and headers.get(m.CONFORMANCE_SELECT.encode()):
            self.hint = [
                h.strip() for h in headers[m.CONFORMANCE_SELECT.encode()].decode().split(",") if h.strip()
            ]
        kind = KINDS.get(headers.get(b":path", b"").split(b"?", 1)[0])
        if kind is None:  # /v1/models, /health, ...: any allowed endpoint, no accounting
            return self._pass_through()
        self.inbound = Inbound.arrive(kind, headers, self.p.pipeline.request_ids)
        try:
            if headers.get(b":method") != b"POST":
                raise APIError(405, f"Use POST for {self.inbound.path.decode()}.")
            self.caller = self.p.pipeline.auth.authenticate(headers)
        except APIError as exc:
            await self.p.pipeline.account.rejected(self.inbound, None, None, exc)
            return self._refuse(exc)
        self.phase = Phase.BODY
        if msg.request_headers.end_of_stream:
            return await self._decide(end_of_stream=True)
        if self.request_mode != _STREAMED:
            return [m.request_headers_response()]  # BUFFERED: deferring here would deadlock
        return []

    async def _request_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.passthrough:
            if self.request_mode == _STREAMED:
                return m.request_body_responses(m.streamed_chunks(body.body, body.end_of_stream))
            return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse()))]
        if self.phase is not Phase.BODY:
            return []  # a repeated end-of-stream chunk (Envoy >= 1.35 on large bodies): already decided
        self.size += len(body.body)
        limit = self.p.pipeline.cfg.gateway.max_body_bytes
        if self.size > limit:
            exc = APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")
            assert self.inbound is not None
            await self.p.pipeline.account.rejected(
                self.inbound, self.caller.ident if self.caller else None, None, exc
            )
            return self._refuse(exc)
        self.body.append(body.body)
        if not body.end_of_stream:
            return []
        return await self._decide(end_of_stream=True)

    async def _decide(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        """The body is complete: run the pipeline up to pick, then answer Envoy."""
        assert self.inbound is not None and self.caller is not None
        t0 = time.perf_counter()
        out = await self._route(end_of_stream)
        if self.p.decisions is not None:
            self.p.decisions.observe(time.perf_counter() - t0)
        return out

    async def _route(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        assert self.inbound is not None and self.caller is not None
        self.phase = Phase.UPSTREAM
        pipe = self.p.pipeline
        try:
            self.ctx = ctx = await pipe.start(self.inbound, b"".join(self.body), self.caller)
        except APIError as exc:
            return self._refuse(exc)
        self.body = []
        try:  # waits for the picked endpoint's room when it has none (`Picker.route`)
            picked = await pipe.picker.route(ctx, self._excluded())
        except APIError as exc:
            ctx.outcome.status = exc.status
            pipe.account.count(ctx)
            await self._close()
            return self._refuse(exc)
        if picked is None:
            ctx.outcome.status = 503
            pipe.account.count(ctx)
            await self._close()
            return self._no_endpoint()
        picked.commit()
        self.held = picked.endpoint
        pipe.picker.hold(ctx, picked.endpoint)
        dest = self._destination(picked.endpoint)
        payload = ctx.plan.payload
        if isinstance(picked.result, PDResult) and self.p.pd is not None:
            # prefill/decode: run the prefill leg here, as the HTTP gateway does, and send Envoy the decode
            # leg's body (the KV's whereabouts in kv_transfer_params) for the decode endpoint
            payload = await self.p.pd.decode_payload(self.p.pool, picked.result, ctx.inbound.path, payload,
                                                     ctx.inbound.rid)
        elif self.p.reads is not None:     # name the replica holding more of the prompt's prefix, if any
            payload = self.p.reads.payload(self.p.pool, picked.endpoint, payload, ctx.inbound.rid,
                                           ctx.plan.view.token_hashes)
        extra = {"content-length": str(len(payload)).encode(), "x-request-id": ctx.inbound.rid}
        route = m.routing_mutation(dest, extra)
        if self.request_mode == _STREAMED:
            return [
                m.request_headers_response(route, m.lb_metadata(dest)),
                *m.request_body_responses(m.streamed_chunks(payload, end_of_stream)),
            ]
        route.body_mutation.body = payload
        return [
            pb.ProcessingResponse(
                request_body=pb.BodyResponse(response=route), dynamic_metadata=m.lb_metadata(dest)
            )
        ]

    def _destination(self, primary: Endpoint) -> str:
        """``ip:port`` of the pick, then up to `fallback_endpoints` others Envoy may retry on: healthy, within
        the subset hint, least loaded first. None in a PD pool (its endpoints are not interchangeable)."""
        dest = address(primary)
        pd = self.p.pool.config.pd
        if not self.p.fallbacks or (pd is not None and pd.enabled):
            return dest
        excluded = set(self._excluded())
        others = [e for e in self.p.pool.endpoints if e is not primary and e.healthy and e.id not in excluded]
        others.sort(key=lambda e: e.in_flight)
        return ",".join([dest, *(address(e) for e in others[: self.p.fallbacks])])

    def _excluded(self) -> list[str]:
        if self.hint is None:
            return []
        return [e.id for e in self.p.pool.endpoints if not m.allowed(address(e), self.hint)]

    def _pass_through(self) -> list[pb.ProcessingResponse]:
        """Route a non-completion request to the least-loaded healthy allowed endpoint."""
        self.passthrough = True
        self.phase = Phase.DONE
        excluded = set(self._excluded())
        eps = [e for e in self.p.pool.endpoints if e.healthy and e.id not in excluded]
        if not eps:
            return self._no_endpoint()
        dest = address(min(eps, key=lambda e: e.in_flight))
        return [m.request_headers_response(m.routing_mutation(dest), m.lb_metadata(dest))]

    def _no_endpoint(self) -> list[pb.ProcessingResponse]:
        where = f"pool `{self.p.pool.name}`" + (" within the subset hint" if self.hint is not None else "")
        return self._refuse(APIError(503, f"No healthy endpoint in {where}.", code="upstream_unavailable",
                                     headers={"retry-after": "1"}))

    def _refuse(self, exc: APIError) -> list[pb.ProcessingResponse]:
        self.phase = Phase.DONE
        return [m.immediate(exc, self.inbound.rid if self.inbound else None)]

    # ---- response ------------------------------------------------------------------------------
    async def _response_headers(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        out: dict[str, bytes] = {}
        if self.ctx is not None and self.phase is Phase.UPSTREAM:
            headers = m.headers_of(msg.response_headers)
            status = headers.get(b":status", b"0")
            self.resp.status = int(status) if status.isdigit() else 0
            self.resp.sse = b"text/event-stream" in headers.get(b"content-type", b"")
            if self.resp.sse:
                strip = self.ctx.plan.inject_usage and self.response_mode == _STREAMED
                self.resp.meter = StreamMeter(self.ctx.inbound.t0, strip=strip)
            served = m.served_endpoint(msg)
            self._credit(served)
            self.phase = Phase.RESPONSE
            if self.p.conformance:
                out[m.CONFORMANCE_SERVED] = (served or "").encode()
            if msg.response_headers.end_of_stream or self.response_mode == ProcessingMode.NONE:
                await self.finish()
        sets = [m.set_header(k, v) for k, v in out.items()]
        return [
            pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=sets))
                )
            )
        ]

    def _credit(self, served: str | None) -> None:
        """Envoy says which endpoint served: move the in-flight count and the routing memory there."""
        ctx, held = self.ctx, self.held
        if served is None or ctx is None or held is None or served == address(held):
            return
        ep = self.p.endpoint_at(served)
        if ep is None:
            return
        held.in_flight -= 1
        ep.in_flight += 1
        self.held = ep
        ctx.outcome.endpoint = ep.id
        ctx.route.pool.router.state.record(ctx.plan.view, ep.id, cold=False)

    async def _response_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        chunk, eos = body.body, body.end_of_stream
        if self.phase is not Phase.RESPONSE or self.ctx is None:
            return self._echo(chunk, eos)
        meter = self.resp.meter
        if meter is not None:
            chunk = meter.feed(chunk, time.perf_counter()) if chunk else chunk
            self.ctx.outcome.streamed = meter.events  # what a stream cut short is charged (TPM)
            if eos:
                chunk += meter.flush()
                await self.finish()
            return self._echo(chunk, eos)
        self.resp.buffered.append(chunk)
        if not eos:
            return [] if self.response_mode == _STREAMED else self._echo(b"", False, mutate=False)
        data = b"".join(self.resp.buffered)
        await self.finish()
        return self._echo(data, True)

    def _echo(self, data: bytes, eos: bool, mutate: bool = True) -> list[pb.ProcessingResponse]:
        if self.response_mode == _STREAMED and mutate:
            return m.response_body_responses(m.streamed_chunks(data, eos))
        return [pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse()))]

    # ---- accounting ----------------------------------------------------------------------------
    async def finish(self) -> None:
        """The response is complete: account for it and release the endpoint (once)."""
        ctx = self.ctx
        if ctx is None or self.phase is Phase.DONE:
            return
        self.phase = Phase.DONE
        r = self.resp
        ctx.outcome.status = r.status
        end = time.perf_counter()
        if r.meter is not None:
            ctx.outcome.ttft, ctx.outcome.gaps = r.meter.ttft, r.meter.gaps
            self.p.pipeline.account.finish(ctx, r.meter.last_at or end, r.meter.usage, r.meter.chunks)
        else:
            usage = json_usage(b"".join(r.buffered)) if r.status == 200 else None
            self.p.pipeline.account.finish(ctx, end, usage, chunks=1)
        ctx.outcome.responded = True  # the whole response went by: served if its status says so (`Picker.release`)
        held, self.held = self.held, None
        if held is not None:
            self.p.pipeline.picker.release(ctx, held)
            if r.status >= 500:
                held.request_failed(self.p.pipeline.cfg.gateway)
            else:
                self.p.pipeline.picker.succeeded(ctx, held)
        await self._close()

    async def abandon(self) -> None:
        """The stream ended early (client gone, Envoy reset, upstream failed): settle the books."""
        ctx = self.ctx
        if ctx is None or self.phase is Phase.DONE:
            return
        meter = self.resp.meter
        if self.phase is Phase.RESPONSE and meter is not None and meter.done:
            # the client had `[DONE]` and hung up before Envoy's end-of-stream reached us
            await self.finish()
            return
        self.phase = Phase.DONE
        ctx.outcome.status = self.resp.status or 499
        self.p.pipeline.account.count(ctx)
        held, self.held = self.held, None
        if held is not None:
            self.p.pipeline.picker.release(ctx, held)
        await self._close()

    async def _close(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            ctx.outcome.responded = True
            await self.p.pipeline.close(ctx)
