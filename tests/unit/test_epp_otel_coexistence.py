"""xds-protos (the picker's Envoy protos) ships an empty `opentelemetry/__init__.py` and its own copies
of `opentelemetry/proto/*` and `google/api/*`: with it installed, the gateway's OpenTelemetry tracing
must still export over OTLP, and opentelemetry-proto's files must be its own (scripts/setup.sh)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from envoy.service.ext_proc.v3 import external_processor_pb2  # noqa: F401  (imported first on purpose)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from inferstack.config import parse_config
from inferstack.gateway.serve import make_tracer_provider


def test_xds_protos_is_installed_with_its_opentelemetry_package():
    files = {str(f) for f in md.files("xds-protos") or []}
    assert "opentelemetry/__init__.py" in files  # the trap this file guards against is present
    assert "envoy/service/ext_proc/v3/external_processor_pb2.py" in files


def _record_mismatches(dist: str) -> list[str]:
    bad = []
    for f in md.files(dist) or []:
        if f.hash is None or f.hash.mode != "sha256" or not str(f).endswith(".py"):
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_binary()).digest()).rstrip(b"=").decode()
        if digest != f.hash.value:
            bad.append(str(f))
    return bad


def test_opentelemetry_proto_and_googleapis_files_are_their_own():
    assert _record_mismatches("opentelemetry-proto") == []
    assert _record_mismatches("googleapis-common-protos") == []


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces":
            _Collector.received.append(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_gateway_tracing_exports_spans_over_otlp():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = parse_config(
            "gateway:\n  tracing:\n    exporter: otlp\n"
            f"    endpoint: http://127.0.0.1:{server.server_port}/v1/traces\n"
        )
        provider = make_tracer_provider(cfg)
        span = provider.get_tracer("t").start_span("chat m", attributes={"gen_ai.request.model": "m"})
        span.end()
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        server.shutdown()
    req = ExportTraceServiceRequest.FromString(_Collector.received[-1])
    spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["chat m"]
    assert {a.key: a.value.string_value for a in spans[0].attributes} == {"gen_ai.request.model": "m"}
    service = {a.key: a.value.string_value for a in req.resource_spans[0].resource.attributes}["service.name"]
    assert service == "inferstack-gateway"
