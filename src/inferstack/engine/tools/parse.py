"""Tool calls out of model output: all at once (non-streamed responses) or delta by delta (streams,
id and name first, then ``arguments`` as the model writes them, as OpenAI streams them)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from inferstack.engine.tools.formats import ToolFormat
from inferstack.engine.tools.scan import scan_calls

_PYTHON_TAG = "<|python_tag|>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str          # the JSON text the model wrote

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def parse_tool_calls(fmt: ToolFormat, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls). Output that is not a complete, well-formed call stays content (as vLLM does)."""
    split = fmt.split(text)
    if split is None:
        return text, []
    content, body = split
    calls: list[ToolCall] = []
    for call in scan_calls(body):
        args = call.arguments(body).strip()
        if not call.complete or call.name is None or not _is_json(args or "{}"):
            return text, []
        calls.append(ToolCall(new_call_id(), call.name, args or "{}"))
    if not calls:
        return text, []
    return content.strip() or None, calls


@dataclass
class ToolCallStreamer:
    """Feeds on text deltas; returns the content delta and OpenAI ``tool_calls`` delta entries.

    Content that may still turn out to open a tool call (a prefix of the start marker; for Llama 3,
    output that starts with "{") is held back until it is clear.
    """

    fmt: ToolFormat
    text: str = ""
    content_sent: int = 0
    sent: list[list[Any]] = field(default_factory=list)     # per call: [id, arguments chars sent]

    @property
    def has_calls(self) -> bool:
        return bool(self.sent)

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self.text += delta
        split = self.fmt.split(self.text)
        if split is None:
            safe = len(self.text) - self._held_back()
            return self._content(safe), []
        content, body = split
        return self._content(len(content)), self._call_deltas(body)

    def finish(self) -> str:
        """The held-back content, when the output turned out not to be a tool call."""
        return "" if self.sent else self._content(len(self.text))

    def _content(self, end: int) -> str:
        out = self.text[self.content_sent:end] if end > self.content_sent else ""
        self.content_sent = max(self.content_sent, end)
        return out

    def _held_back(self) -> int:
        if not self.fmt.start:
            head = self.text.lstrip()
            maybe = not head or head.startswith("{") or _PYTHON_TAG.startswith(head[:len(_PYTHON_TAG)])
            return len(self.text) if maybe else 0
        for n in range(min(len(self.fmt.start) - 1, len(self.text)), 0, -1):
            if self.text.endswith(self.fmt.start[:n]):
                return n
        return 0

    def _call_deltas(self, body: str) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(scan_calls(body)):
            if call.name is None:
                break
            if index == len(self.sent):
                self.sent.append([new_call_id(), 0])
                deltas.append({"index": index, "id": self.sent[index][0], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            args = call.arguments(body)
            if len(args) > self.sent[index][1]:
                deltas.append({"index": index, "function": {"arguments": args[self.sent[index][1]:]}})
                self.sent[index][1] = len(args)
        return deltas
