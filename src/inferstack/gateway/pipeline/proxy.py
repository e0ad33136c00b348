"""proxy: send the planned request upstream and relay the response to an ASGI client.

Retries on another endpoint (`pick` again, excluding those tried) while no byte reached the
client; a streamed response is relayed chunk by chunk, sniffed only for timing and usage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from inferstack.config.schema import GatewayConfig
from inferstack.gateway.datalayer import Endpoint
from inferstack.gateway.kvreuse import DirectReads
from inferstack.gateway.metrics import GatewayMetrics
from inferstack.gateway.pd import PDLegs
from inferstack.gateway.pipeline.account import Accountant
from inferstack.gateway.pipeline.context import RequestContext
from inferstack.gateway.pipeline.pick import Picker
from inferstack.gateway.pipeline.plan import RETRYABLE
from inferstack.gateway.pipeline.usage import StreamMeter, json_usage
from inferstack.gateway.routing.disagg import PDResult
from inferstack.protocol.errors import APIError
from inferstack.protocol.http_cycle import FixedHeaders, fixed_headers
from inferstack.protocol.sse import SSE_DONE, sse_raw

log = logging.getLogger("inferstack.gateway")

JSON = [(b"content-type", b"application/json")]
SERVED = b"x-gateway-destination-endpoint-served"
_SSE = (b"content-type", b"text/event-stream")
_FIXED_KEPT = 64  # (endpoint, content type) pairs whose reply headers are kept checked (`Proxy._fixed`)


class Responder(Protocol):
    """How the proxy answers besides ASGI ``send``: our front's `Cycle`, or `AsgiResponder` over ``send``."""

    async def reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                    fixed: FixedHeaders | None = None) -> None:
        """A whole response: status, headers (with its Content-Length), body, headers checked once."""

    def write_now(self, body: bytes) -> bool:
        """A streamed response's next bytes with no message nor coroutine; False: ``send`` them instead."""


@dataclass(slots=True)
class AsgiResponder:
    """`Responder` over ASGI ``send`` (another server than our front): two messages a reply, every chunk sent."""

    send: Any

    async def reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                    fixed: FixedHeaders | None = None) -> None:
        if fixed is not None:
            headers = [*headers, *fixed.pairs]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    def write_now(self, body: bytes) -> bool:
        return False


class Proxy:
    def __init__(
        self, gw: GatewayConfig, picker: Picker, account: Accountant, pd: PDLegs, metrics: GatewayMetrics,
        reads: DirectReads,
    ):
        self.gw = gw
        self.reads = reads
        self.picker = picker
        self.account = account
        self.pd = pd
        self.metrics = metrics
        # a whole response's content type and endpoint, checked and encoded once per pair (`Cycle.reply`)
        self._fixed: dict[tuple[bytes, bytes], FixedHeaders] = {}

    def _reply_headers(self, ep: Endpoint, ctype: bytes) -> FixedHeaders:
        fixed = self._fixed.get((ep.id_bytes, ctype))
        if fixed is None:
            fixed = fixed_headers(((b"content-type", ctype), (SERVED, ep.id_bytes)))
            if len(self._fixed) < _FIXED_KEPT:  # an engine's content types are few; never an unbounded map
                self._fixed[(ep.id_bytes, ctype)] = fixed
        return fixed

    async def serve(self, ctx: RequestContext, send: Any, out: Responder) -> None:
        """Answer ``ctx`` through ASGI ``send``; a whole (non-streamed) response goes through ``out.reply`` and a
        stream's chunks through ``out.write_now`` (our front's `Cycle`, or `AsgiResponder` over ``send``)."""
        pool = ctx.route.pool
        tried: list[str] = []
        path = ctx.inbound.path
        last_error = "no endpoint"
        retries = self.gw.max_retries
        for attempt in range(retries + 1):
            # the decision is recorded (routing state, metrics) once the request is written upstream, before
            # this task suspends: off a lone request's latency, and no other request routes without it
            try:
                picked = await self.picker.route(ctx, tried, first=attempt == 0)
            except APIError as exc:  # its endpoint's queue refused it, and every other endpoint's
                ctx.outcome.status = exc.status
                self.account.count(ctx)
                await send_error(send, exc, ctx.inbound.rid)
                return
            if picked is None:
                break
            ep = picked.endpoint
            tried.append(ep.id)
            self.picker.hold(ctx, ep)
            try:
                payload = ctx.plan.payload
                if isinstance(picked.result, PDResult):  # prefill/decode disaggregation: prefill leg first
                    picked.commit()
                    payload = await self.pd.decode_payload(
                        pool, picked.result, path, payload, ctx.inbound.rid
                    )
                else:  # another replica may hold more of the prompt: READ it from there
                    payload = self.reads.payload(pool, ep, payload, ctx.inbound.rid, ctx.plan.view.token_hashes)
                outcome = await self._attempt(ctx, ep, payload, send, out, attempt == retries, picked.commit)
            finally:
                picked.commit()  # failed before the request was written: recorded all the same
                self.picker.release(ctx, ep)
            if outcome is None:
                self.picker.succeeded(ctx, ep)
                return
            # retryable failure before any byte reached the client
            ep.request_failed(self.gw)
            last_error = outcome
            log.warning(
                "request %s to %s failed (%s), %s",
                ctx.inbound.rid.decode("latin-1"),
                ep.id,
                outcome,
                "retrying" if attempt < retries else "giving up",
            )
            if attempt < retries:
                self.metrics.retries.labels(pool.name, ep.id, outcome.split(":")[0]).inc()
        ctx.outcome.status = 503 if last_error == "no endpoint" else 502
        self.account.count(ctx)
        msg = (
            f"No healthy endpoint in pool `{pool.name}`."
            if last_error == "no endpoint"
            else f"Every endpoint tried failed (last: {last_error})."
        )
        await send_error(
            send,
            APIError(ctx.outcome.status, msg, code="upstream_unavailable", headers={"retry-after": "1"}),
            ctx.inbound.rid,
        )

    async def _attempt(
        self, ctx: RequestContext, ep: Endpoint, payload: bytes, send: Any, out: Responder, last: bool,
        sent: Callable[[], None],
    ) -> str | None:
        """One upstream try (``sent``: `UpstreamPool.send_request`). Returns None when the client got a
        response, or a reason to retry."""
        head = ep.post_head(ctx.inbound.path, ctx.inbound.rid)
        if ctx.plan.stream:
            return await self._attempt_stream(ctx, ep, payload, send, out, head, last, sent)
        try:  # the exchange here, not in a coroutine of its own: every await passes through each one above it
            conn = await ep.upstream.send_request(head, payload, sent)
            try:
                data = conn.body_now()
                if data is None:
                    data = await conn.read()
            except BaseException:
                conn.close()
                raise
        except RETRYABLE as exc:
            return f"connection: {type(exc).__name__}"
        status, ctype = conn.status, conn.content_type
        conn.release()
        if status >= 500 and not last:
            return f"status {status}"
        ctx.outcome.status = status
        # A non-streamed response arrives whole: its first token's time is unknown, so it feeds
        # E2E only (observing E2E as TTFT would also make TPOT read ~0).
        now = time.perf_counter()
        await out.reply(status, [(b"content-length", b"%d" % len(data)), (b"x-request-id", ctx.inbound.rid)], data,
                        self._reply_headers(ep, ctype))
        ctx.outcome.responded = True
        # the usage is read once the client has its answer: off the response's latency
        self.account.finish(ctx, now, json_usage(data) if status == 200 else None, chunks=1)
        return None

    async def _attempt_stream(
        self, ctx: RequestContext, ep: Endpoint, payload: bytes, send: Any, out: Responder, head: bytes, last: bool,
        sent: Callable[[], None],
    ) -> str | None:
        try:
            conn = await ep.upstream.send_request(head, payload, sent)
        except OSError as exc:
            return f"connection: {type(exc).__name__}"
        try:
            if conn.status != 200:
                return await self._relay_refusal(ctx, ep, conn, send, last)
            await self._relay_stream(ctx, ep, conn, send, out.write_now)
            return None
        except BaseException:
            conn.close()  # cancelled (client gone) or failed: drop the upstream connection
            raise

    async def _relay_refusal(
        self, ctx: RequestContext, ep: Endpoint, conn: Any, send: Any, last: bool
    ) -> str | None:
        """A streamed request answered with an error status: relay it whole, or retry a 5xx."""
        if conn.status >= 500 and not last:
            conn.close()
            return f"status {conn.status}"
        try:
            data = await conn.read()
        except OSError as exc:
            conn.close()
            return f"connection: {type(exc).__name__}"
        ctx.outcome.status = conn.status
        await send(
            {
                "type": "http.response.start",
                "status": conn.status,
                "headers": [
                    (b"content-type", conn.content_type),
                    (b"x-request-id", ctx.inbound.rid),
                    (SERVED, ep.id_bytes),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})
        ctx.outcome.responded = True
        self.account.count(ctx)
        conn.release()
        return None

    async def _relay_stream(self, ctx: RequestContext, ep: Endpoint, conn: Any, send: Any,
                            write_now: Callable[[bytes], bool]) -> None:
        """Relay SSE chunk by chunk (whole events), metering TTFT, gaps and usage; a chunk goes out through
        ``write_now`` (no message dict, no coroutine) unless it must wait for the client's drain."""
        out = ctx.outcome
        out.status = 200
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    _SSE,
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", ctx.inbound.rid),
                    (SERVED, ep.id_bytes),
                ],
            }
        )
        meter = StreamMeter(ctx.inbound.t0, strip=ctx.plan.inject_usage)
        try:
            while (chunk := await conn.next_chunk()) is not None:
                chunk = meter.feed(chunk, time.perf_counter())
                if chunk:
                    out.streamed = meter.events  # what a stream cut short here is charged (TPM)
                    if not write_now(chunk):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    # [DONE] went out: the client has the whole answer, and a client that closes now (the
                    # OpenAI SDK does, before the stream's terminator) has not abandoned it: it stays served
                    out.responded = out.responded or meter.done
            if rest := meter.flush():
                await send({"type": "http.response.body", "body": rest, "more_body": True})
        except OSError as exc:
            # never retry once streaming began: tell the client, end the stream cleanly
            conn.close()
            out.status = 502
            err = APIError(502, f"The upstream endpoint failed mid-stream ({exc}).", code="upstream_error")
            await send(
                {"type": "http.response.body", "body": sse_raw(err.body()) + SSE_DONE, "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})
        out.responded = True
        conn.release()
        out.ttft, out.gaps = meter.ttft, meter.gaps
        self.account.finish(ctx, meter.last_at or time.perf_counter(), meter.usage, chunks=meter.chunks)


async def respond(send: Any, status: int, body: bytes, headers: list | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*(headers or JSON), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Any, exc: APIError, rid: bytes | None = None) -> None:
    headers = [*JSON, *((k.encode(), v.encode()) for k, v in exc.headers.items())]
    if rid:
        headers.append((b"x-request-id", rid))
    await respond(send, exc.status, exc.body(), headers)
