"""What the gateway reads from and writes into a request body (parsed once, serialized once)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def prompt_parts(kind: str, req: dict[str, Any]) -> Iterator[str]:
    """Text the prefix index hashes, in order: roles and text content of chat messages, or the
    completion prompt. Malformed shapes yield nothing (the engine reports the 400)."""
    if kind == "chat":
        msgs = req.get("messages")
        if not isinstance(msgs, list):
            return
        for m in msgs:
            if not isinstance(m, dict):
                continue
            role = m.get("role")
            if isinstance(role, str):
                yield role
                yield "\x1e"
            content = m.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part["text"]
            yield "\x1f"
    else:
        prompt = req.get("prompt")
        if isinstance(prompt, str):
            yield prompt
        elif isinstance(prompt, list) and prompt:
            first = prompt[0]
            if isinstance(first, str):
                yield first
            elif isinstance(first, int):
                yield ",".join(str(t) for t in prompt[:4096] if isinstance(t, int))
            elif isinstance(first, list):
                yield ",".join(str(t) for t in first[:4096] if isinstance(t, int))


def session_key(req: dict[str, Any], header: bytes | None) -> str | None:
    if header:
        return header.decode("latin-1")
    user = req.get("user")
    return user if isinstance(user, str) and user else None


def engine_priority(gateway_priority: int) -> int:
    """GIE: higher is more important. vLLM/inferstack engines: lower is served first."""
    return -gateway_priority
