"""OpenAI wire protocol shared by the engine server and the gateway: request models, response and
chunk builders, the error envelope, SSE framing and the OpenAPI document.

A leaf package: it imports nothing else from inferstack, so any server (or client) can reuse it.
"""

from inferstack.protocol.errors import APIError, error_body, error_from_exception
from inferstack.protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_request,
)
from inferstack.protocol.sse import SSE_DONE, SSEDecoder, sse_event

__all__ = [
    "SSE_DONE",
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "SSEDecoder",
    "TokenizeRequest",
    "error_body",
    "error_from_exception",
    "parse_request",
    "sse_event",
]
