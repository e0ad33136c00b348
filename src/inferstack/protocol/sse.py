"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` frames ending with ``data: [DONE]``."""

from __future__ import annotations

from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(obj: Any) -> bytes:
    """One SSE frame carrying ``obj`` as compact JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_raw(payload: bytes) -> bytes:
    """One SSE frame around an already-encoded JSON payload (a proxy forwards bytes untouched)."""
    return b"data: " + payload + b"\n\n"


class SSEDecoder:
    """Incremental parser: feed it bytes as they arrive, get back the complete ``data`` payloads.

    Follows the SSE rules that matter for OpenAI streams: events end with a blank line, several
    ``data:`` lines in one event are joined with newlines, comments (``:``) and other fields are skipped,
    and ``\\r\\n`` line endings are accepted.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        events: list[bytes] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return events
            line = self._buf[:nl].rstrip(b"\r")
            self._buf = self._buf[nl + 1:]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)

    def flush(self) -> list[bytes]:
        """Payload of a final event the stream closed without a blank line after."""
        rest = self.feed(b"\n\n") if self._buf or self._data else []
        return rest


def is_done(payload: bytes) -> bool:
    return payload.strip() == b"[DONE]"
