"""SSE events of an OpenAI stream, from body bytes that may have unseen stretches, and what each one says.

Complete events are parsed as JSON with the same rules as the bench client (inferstack.bench.client:
a content chunk has a choice with non-empty `text` or `delta.content`). An event whose tail was not
captured is read with patterns over the prefix that was; see `classify`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import orjson

_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_CONTENT = re.compile(rb'"(?:content|text)"\s*:\s*"(.)')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_FIELD = re.compile(rb'"(prompt_tokens|completion_tokens|cached_tokens)"\s*:\s*(\d+)')
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_FIELD_START = (b"data:", b":", b"event:", b"id:", b"retry:")


@dataclass(frozen=True)
class EventInfo:
    done: bool = False               # data: [DONE]
    content: bool = False            # carries generated text
    certain: bool = True             # decided from the whole event (False: from a truncated prefix)
    error: bool = False
    model: str | None = None
    usage: dict[str, int] | None = None


def _usage_from_json(u: object) -> dict[str, int] | None:
    if not isinstance(u, dict) or u.get("completion_tokens") is None:
        return None
    out = {"completion_tokens": int(u["completion_tokens"])}
    if u.get("prompt_tokens") is not None:
        out["prompt_tokens"] = int(u["prompt_tokens"])
    details = u.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        out["cached_tokens"] = int(details["cached_tokens"])
    return out


def classify_json(obj: object) -> EventInfo:
    if not isinstance(obj, dict):
        return EventInfo()
    content = False
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or choice.get("message") or {}).get("content")
            content = content or bool(text)
    model = obj.get("model")
    return EventInfo(content=content, error="error" in obj, model=model if isinstance(model, str) else None,
                     usage=_usage_from_json(obj.get("usage")))


def classify_prefix(raw: bytes) -> EventInfo:
    """What a truncated JSON prefix shows. A chunk cut before its choices is counted as content (the
    common case in a token stream; `certain` says it was a guess)."""
    model = _MODEL.search(raw)
    usage = {k.decode(): int(v) for k, v in _USAGE_FIELD.findall(raw)}
    m = _CONTENT.search(raw)
    if m:
        content, certain = m.group(1) != b'"', True
    elif _EMPTY_CHOICES.search(raw) or "completion_tokens" in usage:
        content, certain = False, True
    else:
        content, certain = True, False
    return EventInfo(content=content, certain=certain, error=b'"error"' in raw[:16],
                     model=model.group(1).decode("utf-8", "replace") if model else None,
                     usage=usage if "completion_tokens" in usage else None)


def classify(event: bytes, truncated: bool) -> EventInfo:
    lines = [ln[5:].lstrip(b" ") for ln in event.replace(b"\r\n", b"\n").split(b"\n") if ln.startswith(b"data:")]
    if not lines:
        return EventInfo(certain=not truncated)
    payload = b"\n".join(lines)
    if payload.strip() == b"[DONE]":
        return EventInfo(done=True)
    if not truncated:
        try:
            return classify_json(orjson.loads(payload))
        except orjson.JSONDecodeError:
            pass
    return classify_prefix(payload)


class SSEScanner:
    """Splits body bytes into events; `emit(ts_ns, event_bytes, truncated)` per event, timed when its
    last byte moved. After an unseen stretch, a piece that starts a field ends the event before it (one
    write per event is what servers do; the framing inside the gap cannot be seen)."""

    def __init__(self, emit: Callable[[int, bytes, bool], None]) -> None:
        self.emit = emit
        self._buf = b""
        self._truncated = False
        self._after_gap = False
        self._last_ns = 0

    def feed(self, ts_ns: int, data: bytes) -> None:
        if self._after_gap and (self._buf or self._truncated) and data.startswith(_FIELD_START):
            self.emit(self._last_ns, self._buf, True)
            self._buf, self._truncated = b"", False
        self._after_gap = False
        self._buf += data
        self._last_ns = ts_ns
        while True:
            m = _EVENT_END.search(self._buf)
            if not m:
                return
            event, self._buf = self._buf[:m.start()], self._buf[m.end():]
            if event or self._truncated:
                self.emit(ts_ns, event, self._truncated)
            self._truncated = False

    def gap(self, ts_ns: int) -> None:
        self._truncated = self._after_gap = True
        self._last_ns = ts_ns

    def close(self) -> None:
        if self._buf.strip() or self._truncated:
            self.emit(self._last_ns, self._buf, self._truncated)
        self._buf, self._truncated = b"", False
