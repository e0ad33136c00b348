"""Building and reading Envoy ext_proc v3 messages, as GIE v1's endpoint picker protocol wants them.

Pure functions over the compiled protos from `xds-protos` (no hand-written .proto code):
destination header + ``envoy.lb`` metadata, streamed body chunks, immediate responses, and the
subset hint / served endpoint read from ``metadata_context``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from inferstack.protocol.errors import APIError

DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
CONFORMANCE_SELECT = "test-epp-endpoint-selection"
CONFORMANCE_SERVED = "x-conformance-test-served-endpoint"
CHUNK_LIMIT = 62_000  # bytes per streamed chunk: some Envoy builds cap at 64 KiB, GIE keeps a margin


def headers_of(msg: pb.HttpHeaders) -> dict[bytes, bytes]:
    """Envoy's header map as the pipeline reads headers (lower-case bytes; last value wins)."""
    out: dict[bytes, bytes] = {}
    for h in msg.headers.headers:
        out[h.key.lower().encode("latin-1")] = h.raw_value or h.value.encode("latin-1")
    return out


def set_header(key: str, value: bytes) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def lb_metadata(destination: str) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    md.fields[LB_NAMESPACE].struct_value.fields[DESTINATION].string_value = destination
    return md


def routing_mutation(destination: str, extra: Mapping[str, bytes] | None = None) -> pb.CommonResponse:
    """Route to ``destination`` (``ip:port[,fallback...]``): header set, route cache cleared."""
    sets = [
        set_header(DESTINATION, destination.encode()),
        *(set_header(k, v) for k, v in (extra or {}).items()),
    ]
    return pb.CommonResponse(clear_route_cache=True, header_mutation=pb.HeaderMutation(set_headers=sets))


def request_headers_response(
    common: pb.CommonResponse | None = None, metadata: struct_pb2.Struct | None = None
) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=common or pb.CommonResponse()), dynamic_metadata=metadata
    )


def streamed_chunks(body: bytes, end_of_stream: bool) -> list[pb.CommonResponse]:
    """``body`` as FULL_DUPLEX_STREAMED body mutations of at most CHUNK_LIMIT bytes each; the last
    carries ``end_of_stream``. An empty body is one empty chunk (Envoy still needs the EoS)."""
    pieces = [body[i : i + CHUNK_LIMIT] for i in range(0, len(body), CHUNK_LIMIT)] or [b""]
    last = len(pieces) - 1
    return [
        pb.CommonResponse(
            body_mutation=pb.BodyMutation(
                streamed_response=pb.StreamedBodyResponse(body=p, end_of_stream=end_of_stream and i == last)
            )
        )
        for i, p in enumerate(pieces)
    ]


def request_body_responses(commons: Iterable[pb.CommonResponse]) -> list[pb.ProcessingResponse]:
    return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=c)) for c in commons]


def response_body_responses(commons: Iterable[pb.CommonResponse]) -> list[pb.ProcessingResponse]:
    return [pb.ProcessingResponse(response_body=pb.BodyResponse(response=c)) for c in commons]


def immediate(exc: APIError, rid: bytes | None = None) -> pb.ProcessingResponse:
    """An OpenAI error envelope sent by Envoy in place of the upstream response."""
    sets = [
        set_header("content-type", b"application/json"),
        *(set_header(k, v.encode()) for k, v in exc.headers.items()),
    ]
    if rid:
        sets.append(set_header("x-request-id", rid))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=exc.status),
            headers=pb.HeaderMutation(set_headers=sets),
            body=exc.body(),
            details=exc.code or "",
        )
    )


def _lb_value(msg: pb.ProcessingRequest, namespace: str, key: str) -> list[str] | None:
    """A string or list-of-strings metadata value, split on commas; None when absent."""
    ns = msg.metadata_context.filter_metadata.get(namespace)
    if ns is None or key not in ns.fields:
        return None
    v = ns.fields[key]
    raw = [v.string_value] if v.HasField("string_value") else [x.string_value for x in v.list_value.values]
    return [p.strip() for s in raw for p in s.split(",") if p.strip()]


def subset_hint(msg: pb.ProcessingRequest) -> list[str] | None:
    """The endpoints the data plane allows (``ip:port`` or bare ``ip`` = every port); None = all."""
    return _lb_value(msg, SUBSET_NAMESPACE, SUBSET_KEY)


def served_endpoint(msg: pb.ProcessingRequest) -> str | None:
    got = _lb_value(msg, LB_NAMESPACE, SERVED)
    return got[0] if got else None


def allowed(address: str, hint: Iterable[str]) -> bool:
    """Whether ``address`` (``host:port``) is named by a subset hint entry."""
    host = address.rsplit(":", 1)[0]
    return any(h in (address, host) or h.strip("[]") == host.strip("[]") for h in hint)
