"""The picker's per-request ext_proc state machine, message by message (no network: the pipeline
runs for real over a pool whose endpoints are never contacted before the pick)."""

from __future__ import annotations

import asyncio
import hashlib

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from inferstack.config import parse_config
from inferstack.epp import messages as m
from inferstack.epp.stream import EndpointPicker, Stream
from inferstack.gateway.pipeline import Pipeline

EPS = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
KEY = "sk-a"


def _picker(pool_extra: str = "", extra: str = "") -> EndpointPicker:
    cfg = parse_config(
        "pools:\n  p:\n    models: [m]\n    endpoints: ["
        + ", ".join(f"http://{e}" for e in EPS)
        + "]\n"
        + pool_extra
        + f"keys:\n  - sha256: {hashlib.sha256(KEY.encode()).hexdigest()}\n    tenant: t\n"
        + extra
    )
    pipe = Pipeline(cfg)
    return EndpointPicker(pipe, pipe.pools["p"])


def _headers(
    path: str = "/v1/completions",
    eos: bool = False,
    key: str | None = KEY,
    mode: int | None = None,
    subset: list[str] | None = None,
    objective: str | None = None,
) -> pb.ProcessingRequest:
    hs = [(":path", path), (":method", "POST"), ("content-type", "application/json")]
    if objective:
        hs.append(("x-gateway-inference-objective", objective))
    if key:
        hs.append(("authorization", f"Bearer {key}"))
    msg = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs]
            ),
            end_of_stream=eos,
        )
    )
    if mode is not None:
        msg.protocol_config.request_body_mode = mode
        msg.protocol_config.response_body_mode = mode
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.fields[m.SUBSET_KEY].list_value.extend(subset)
        msg.metadata_context.filter_metadata[m.SUBSET_NAMESPACE].CopyFrom(hint)
    return msg


def _body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def _run(coro):
    return asyncio.run(coro)


REQ = orjson.dumps({"model": "m", "prompt": "x" * 150_000, "max_tokens": 3})


def test_full_duplex_defers_headers_and_echoes_the_body_in_bounded_chunks():
    async def main():
        s = Stream(_picker())
        assert await s.handle(_headers()) == []  # deferred until the body's end
        assert await s.handle(_body(REQ[:70_000], False)) == []
        out = await s.handle(_body(REQ[70_000:], True))
        dup = await s.handle(_body(REQ[-10:], True))  # Envoy >= 1.35 may repeat the last chunk
        return s, out, dup

    s, out, dup = _run(main())
    assert dup == []
    first, chunks = out[0], out[1:]
    assert first.WhichOneof("response") == "request_headers"
    common = first.request_headers.response
    assert common.clear_route_cache
    sets = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    dest = sets[m.DESTINATION].decode()
    assert dest in EPS
    assert (
        first.dynamic_metadata.fields[m.LB_NAMESPACE].struct_value.fields[m.DESTINATION].string_value == dest
    )
    bodies = [c.request_body.response.body_mutation.streamed_response for c in chunks]
    assert all(len(b.body) <= m.CHUNK_LIMIT for b in bodies)
    assert [b.end_of_stream for b in bodies] == [False] * (len(bodies) - 1) + [True]
    sent = orjson.loads(b"".join(b.body for b in bodies))
    assert sent["cache_salt"] == "t" and sent["prompt"] == "x" * 150_000  # the rewritten body
    assert int(sets["content-length"]) == len(b"".join(b.body for b in bodies))
    assert s.p.pool.by_id(dest).in_flight == 1


def test_buffered_mode_answers_headers_at_once_and_routes_in_the_body_response():
    async def main():
        s = Stream(_picker())
        head = await s.handle(_headers(mode=ProcessingMode.BUFFERED))
        body = await s.handle(_body(REQ, True))
        return head, body

    head, body = _run(main())
    assert [r.WhichOneof("response") for r in head] == ["request_headers"]
    assert not head[0].request_headers.response.header_mutation.set_headers
    (resp,) = body
    common = resp.request_body.response
    dest = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}[m.DESTINATION]
    assert (
        resp.dynamic_metadata.fields[m.LB_NAMESPACE].struct_value.fields[m.DESTINATION].string_value
        == dest.decode()
    )
    assert orjson.loads(common.body_mutation.body)["model"] == "m"


@pytest.mark.parametrize(
    ("msgs", "status", "code"),
    [
        ([_headers(key="sk-wrong")], 401, "invalid_api_key"),
        ([_headers(), _body(b"{nope", True)], 400, "invalid_json"),
        ([_headers(), _body(b"x" * (9 << 20), True)], 413, "request_too_large"),
        ([_headers(subset=["10.9.9.9"]), _body(REQ, True)], 503, "upstream_unavailable"),
    ],
)
def test_refusals_are_immediate_responses_with_the_openai_envelope(msgs, status, code):
    async def main():
        s = Stream(_picker())
        return [r for msg in msgs for r in await s.handle(msg)]

    out = _run(main())
    resp = out[-1].immediate_response
    assert resp.status.code == status
    assert orjson.loads(resp.body)["error"]["code"] == code


def test_subset_hint_with_a_bare_ip_allows_every_port_of_it():
    async def main():
        s = Stream(_picker())
        await s.handle(_headers(subset=["10.0.0.2"]))
        return await s.handle(_body(REQ, True))

    out = _run(main())
    sets = {
        h.header.key: h.header.raw_value for h in out[0].request_headers.response.header_mutation.set_headers
    }
    assert sets[m.DESTINATION] == b"10.0.0.2:8000"


def _served_headers(served: str, ctype: str) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                    base_pb2.HeaderValue(key="content-type", raw_value=ctype.encode()),
                ]
            )
        )
    )
    lb = struct_pb2.Struct()
    lb.fields[m.SERVED].string_value = served
    msg.metadata_context.filter_metadata[m.LB_NAMESPACE].CopyFrom(lb)
    return msg


def test_stream_response_is_metered_and_credited_to_the_endpoint_that_served():
    sse = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
    )

    async def main():
        p = _picker()
        s = Stream(p)
        await s.handle(_headers())
        body = {"model": "m", "prompt": "a shared document " * 20, "stream": True}
        out = await s.handle(_body(orjson.dumps(body), True))
        picked = {
            h.header.key: h.header.raw_value
            for h in out[0].request_headers.response.header_mutation.set_headers
        }
        other = next(e for e in EPS if e != picked[m.DESTINATION].decode())
        await s.handle(_served_headers(other, "text/event-stream"))
        in_flight = {e: p.pool.by_id(e).in_flight for e in EPS}
        hashes = s.ctx.plan.view.prefix_hashes
        echoed = await s.handle(pb.ProcessingRequest(response_body=pb.HttpBody(body=sse, end_of_stream=True)))
        return p, other, in_flight, echoed, hashes

    p, other, in_flight, echoed, hashes = _run(main())
    assert hashes and p.pool.router.state.approx.match(hashes).get(other) == len(hashes)  # prefix credited
    assert in_flight == {e: int(e == other) for e in EPS}  # in-flight moved to the served endpoint
    assert all(p.pool.by_id(e).in_flight == 0 for e in EPS)
    body = b"".join(r.response_body.response.body_mutation.streamed_response.body for r in echoed)
    assert b'"usage"' not in body and b'"content":"a"' in body  # injected usage event stripped
    reg = p.pipeline.metrics.registry
    labels = {"model": "m", "pool": "p", "tenant": "t"}
    assert reg.get_sample_value("inferstack_gateway_tokens_total", {**labels, "type": "output"}) == 2
    assert (
        reg.get_sample_value(
            "inferstack_gateway_requests_total", {**labels, "endpoint": other, "status": "200"}
        )
        == 1
    )


def test_flow_control_shed_is_an_immediate_429_with_retry_after():
    async def main():
        p = _picker("    max_concurrency: 1\n", "objectives:\n  batch:\n    priority: -1\n")
        held = []
        for _ in EPS:  # one request in flight on every endpoint: the pool is full
            s = Stream(p)
            await s.handle(_headers())
            held.append(await s.handle(_body(REQ, True)))
        shed = Stream(p)
        await shed.handle(_headers(objective="batch"))
        return p, held, await shed.handle(_body(REQ, True))

    p, held, out = _run(main())
    assert all(r[0].WhichOneof("response") == "request_headers" for r in held)
    resp = out[0].immediate_response
    assert resp.status.code == 429
    assert orjson.loads(resp.body)["error"]["code"] == "shed"
    assert {h.header.key: h.header.raw_value for h in resp.headers.set_headers}["retry-after"] == b"1"
    assert (
        p.pipeline.metrics.registry.get_sample_value(
            "inferstack_gateway_shed_total", {"pool": "p", "reason": "shed"}
        )
        == 1
    )


def test_a_stream_reset_after_done_is_accounted_as_served():
    """Envoy forwards `[DONE]` before its end-of-stream message reaches the picker; a client that
    hangs up in between resets the ext_proc stream. The response was complete: account it."""
    sse = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )

    async def main():
        p = _picker()
        s = Stream(p)
        await s.handle(_headers())
        out = await s.handle(_body(orjson.dumps({"model": "m", "prompt": "hi", "stream": True}), True))
        dest = {
            h.header.key: h.header.raw_value
            for h in out[0].request_headers.response.header_mutation.set_headers
        }
        await s.handle(_served_headers(dest[m.DESTINATION].decode(), "text/event-stream"))
        await s.handle(pb.ProcessingRequest(response_body=pb.HttpBody(body=sse, end_of_stream=False)))
        await s.abandon()
        return p, dest[m.DESTINATION].decode()

    p, dest = _run(main())
    reg = p.pipeline.metrics.registry
    labels = {"model": "m", "pool": "p", "tenant": "t"}
    assert reg.get_sample_value("inferstack_gateway_tokens_total", {**labels, "type": "output"}) == 2
    assert (
        reg.get_sample_value(
            "inferstack_gateway_requests_total", {**labels, "endpoint": dest, "status": "200"}
        )
        == 1
    )
    assert p.pool.by_id(dest).in_flight == 0


def test_a_failure_while_routing_answers_500_envelope_and_frees_the_endpoint():
    async def main():
        p = _picker()
        s = Stream(p)
        await s.handle(_headers())
        await s.handle(_body(orjson.dumps({"model": "m", "prompt": "hi"}), True))  # routed: one endpoint held
        held = sum(p.pool.by_id(e).in_flight for e in EPS)
        out = await s.failed(_body(b"", True))  # as if that message had raised inside `handle`
        return p, held, out

    p, held, out = _run(main())
    assert held == 1 and all(p.pool.by_id(e).in_flight == 0 for e in EPS)
    imm = out[0].immediate_response
    assert imm.status.code == 500 and orjson.loads(imm.body)["error"]["code"] == "internal_error"


def test_a_failure_while_relaying_passes_the_engines_answer_through_unchanged():
    chunk = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'

    async def main():
        p = _picker()
        s = Stream(p)
        await s.handle(_headers())
        out = await s.handle(_body(orjson.dumps({"model": "m", "prompt": "hi", "stream": True}), True))
        dest = {h.header.key: h.header.raw_value for h in out[0].request_headers.response.header_mutation.set_headers}
        await s.handle(_served_headers(dest[m.DESTINATION].decode(), "text/event-stream"))
        first = await s.failed(pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=False)))
        rest = await s.handle(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: [DONE]\n\n",
                                                                             end_of_stream=True)))
        return p, first, rest

    p, first, rest = _run(main())
    relayed = b"".join(r.response_body.response.body_mutation.streamed_response.body for r in [*first, *rest])
    assert relayed == chunk + b"data: [DONE]\n\n"  # byte for byte, metering off
    assert all(p.pool.by_id(e).in_flight == 0 for e in EPS)


def _stream_to(p: EndpointPicker, s: Stream, status: bytes = b"200") -> None:
    """Route one streamed request through ``s`` and let the engine's response headers through."""

    async def main():
        await s.handle(_headers())
        out = await s.handle(_body(orjson.dumps({"model": "m", "prompt": "hi", "stream": True}), True))
        dest = {h.header.key: h.header.raw_value for h in out[0].request_headers.response.header_mutation.set_headers}
        headers = _served_headers(dest[m.DESTINATION].decode(), "text/event-stream")
        headers.response_headers.headers.headers[0].raw_value = status
        await s.handle(headers)

    return main()


def test_only_a_served_request_is_a_completion_for_flow_control():
    """A client that cancels mid-stream, or an engine's 5xx, frees the slot but is no evidence of the pool's
    pace: it must not end flow control's no-evidence hold nor feed the service rate; a reset after
    `[DONE]` and a finished stream are completions (failed on the code that completed every release)."""
    chunk = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'

    async def main():
        p = _picker()
        queue = p.pipeline.flow["p"].queue
        seen = []
        cancelled = Stream(p)  # the client goes away after one token
        await _stream_to(p, cancelled)
        await cancelled.handle(pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=False)))
        await cancelled.abandon()
        failed = Stream(p)  # the engine answers 503
        await _stream_to(p, failed, b"503")
        await failed.handle(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"{}", end_of_stream=True)))
        seen.append((queue.completions_seen, queue.evidence(), sum(e.in_flight for e in p.pool.endpoints)))
        done = Stream(p)  # the client hangs up once it has [DONE]
        await _stream_to(p, done)
        await done.handle(pb.ProcessingRequest(
            response_body=pb.HttpBody(body=chunk + b"data: [DONE]\n\n", end_of_stream=False)))
        await done.abandon()
        seen.append((queue.completions_seen, queue.evidence(), sum(e.in_flight for e in p.pool.endpoints)))
        return seen

    assert _run(main()) == [(False, False, 0), (True, True, 0)]
