"""`python -m support.faulty_picker epp serve ...`: the real endpoint picker, except that a request
carrying ``x-test-picker-fault: route`` (or ``response``) makes its stream raise while routing (or
while relaying the response body), as a picker bug would. The tests behind Envoy check what the
client then gets (tests/integration/test_epp_envoy.py)."""

from __future__ import annotations

from inferstack.cli.main import main
from inferstack.epp import stream

FAULT = b"x-test-picker-fault"
_route, _response_body = stream.Stream._route, stream.Stream._response_body


def _fault(s: stream.Stream) -> bytes:
    return s.inbound.headers.get(FAULT, b"") if s.inbound is not None else b""


async def _faulty_route(self: stream.Stream, end_of_stream: bool):
    out = await _route(self, end_of_stream)  # routed first: the failure must give the slot back
    if _fault(self) == b"route":
        raise RuntimeError("injected picker fault while routing")
    return out


async def _faulty_response_body(self: stream.Stream, body):
    if _fault(self) == b"response" and self.phase is stream.Phase.RESPONSE:
        raise RuntimeError("injected picker fault while relaying the response")
    return await _response_body(self, body)


if __name__ == "__main__":
    stream.Stream._route = _faulty_route
    stream.Stream._response_body = _faulty_response_body
    main()
