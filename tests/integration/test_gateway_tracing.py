"""OpenTelemetry spans per request (in-memory exporter), gateway app in-process over a real engine."""

from __future__ import annotations

import asyncio

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inferstack.config import parse_config
from inferstack.gateway.server import Gateway
from support.gateway_procs import start_fake_engine


def test_one_span_per_request_with_genai_attributes():
    engine = start_fake_engine("--tokens", "3")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = parse_config(f"pools:\n  p:\n    endpoints: [{engine.url}]\n")

    async def main():
        app = Gateway(cfg, tracer_provider=provider)
        await app.datalayer.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                r = await c.post("/v1/chat/completions", headers={"x-request-id": "req-123"},
                                 json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
                assert r.headers["x-request-id"] == "req-123"
                # through ASGI (`proxy.AsgiResponder`): the reply's fixed headers are among its headers
                assert r.headers["content-type"].startswith("application/json")
                assert r.headers["x-gateway-destination-endpoint-served"] == engine.url.split("//", 1)[1]
                r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "stream": True})
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        finally:
            await app.datalayer.stop()

    try:
        asyncio.run(main())
    finally:
        engine.stop()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["chat fake-model", "text_completion fake-model"]
    a = spans[0].attributes
    assert a["gen_ai.request.model"] == "fake-model" and a["gen_ai.usage.output_tokens"] == 3
    assert a["inferstack.request_id"] == "req-123" and a["http.response.status_code"] == 200
    assert spans[1].attributes["gen_ai.usage.output_tokens"] == 3
