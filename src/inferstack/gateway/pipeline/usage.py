"""Reading usage and token timing out of engine responses, shared by the HTTP proxy and the Envoy
picker (which sees the same bytes as ext_proc response-body chunks)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

_FIRST_TOKEN = re.compile(rb'"(?:content|text)":\s*"[^"]')


def json_usage(data: bytes) -> dict[str, Any] | None:
    """``usage`` of a whole (non-streamed) JSON response, if it has one.

    Engines write ``usage`` after the choices, so the object from its last key on is parsed first: ``{`` and the
    tail from that key is valid JSON exactly when the key is one of the response's own (a key in a nested
    object leaves closing brackets over, a string value "usage" is no key), and its ``usage`` is the response's
    (the last of duplicate keys, as a whole parse); a response malformed before that key is still charged by it.
    Else the whole response is parsed. A long answer's text is not decoded to find a few counts."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    try:
        usage = orjson.loads(b"{" + data[at:]).get("usage")
    except orjson.JSONDecodeError:
        try:
            usage = orjson.loads(data).get("usage")
        except (orjson.JSONDecodeError, AttributeError):
            return None
    return usage if isinstance(usage, dict) else None


def take_usage(chunk: bytes, strip: bool) -> tuple[bytes, dict | None]:
    """Find the usage-only event (``"choices":[]``) in a chunk; drop it if the gateway asked for it."""
    usage = None
    kept = []
    for ev in chunk.split(b"\n\n"):
        if b'"usage"' in ev and ev.startswith(b"data:"):
            try:
                obj = orjson.loads(ev[5:])
            except orjson.JSONDecodeError:
                kept.append(ev)
                continue
            u = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(u, dict):
                usage = u
                if strip and not obj.get("choices"):
                    continue
        kept.append(ev)
    return b"\n\n".join(kept), usage


@dataclass(slots=True)
class StreamMeter:
    """Follows an SSE stream chunk by chunk: time to the first content, gaps between chunks,
    event count and the final usage. ``strip`` drops the usage-only event we injected.

    Only whole events (up to the last blank line) are passed on; a partial event waits for the
    rest. Proxies re-cut streams (Envoy does), and a usage event split across two chunks would
    otherwise be neither read nor stripped."""

    t0: float
    strip: bool
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    events: int = 0
    usage: dict | None = None
    done: bool = False  # `data: [DONE]` went by: the client has the whole answer
    _first_at: float = 0.0
    _last_at: float = 0.0
    _tail: bytes = b""

    def feed(self, chunk: bytes, now: float) -> bytes:
        """The whole events to forward now (empty: nothing yet, or all stripped)."""
        if self._tail:
            chunk, self._tail = self._tail + chunk, b""
        end = chunk.rfind(b"\n\n")
        cut = end + 2 if end >= 0 else 0
        if cut < len(chunk):
            chunk, self._tail = chunk[:cut], chunk[cut:]
        if not chunk:
            return chunk
        if b'"usage":{' in chunk or b'"usage": {' in chunk:
            chunk, u = take_usage(chunk, strip=self.strip)
            self.usage = u or self.usage
            if not chunk:
                return chunk
        if self._first_at == 0.0:
            # the first non-empty content or text, wherever it sits in a chunk that a proxy may have
            # coalesced with the role-only event before it
            if _FIRST_TOKEN.search(chunk):
                self._first_at = now
                self.ttft = now - self.t0
        else:
            self.gaps.append(now - self._last_at)
        self._last_at = now
        self.events += chunk.count(b"data:")
        self.done = self.done or b"data: [DONE]" in chunk
        return chunk

    def flush(self) -> bytes:
        """What is left at the end of the stream (an unterminated last event), to forward as is."""
        tail, self._tail = self._tail, b""
        return tail

    @property
    def last_at(self) -> float:
        return self._last_at

    @property
    def chunks(self) -> int:
        """Output tokens to assume when the engine sent no usage: one per content event."""
        return max(1, self.events - 1)
