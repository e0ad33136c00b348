"""What the gateway reads from and writes into a request body (parsed once, serialized once)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from inferstack.protocol.errors import APIError
from inferstack.protocol.ids import bounded_key


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
    """The affinity key: bounded (`bounded_key`), since the router remembers it."""
    if header:
        return bounded_key(header.decode("latin-1"))
    user = req.get("user")
    return bounded_key(user) if isinstance(user, str) and user else None


def _positive_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def prompt_count(kind: str, req: dict[str, Any]) -> int:
    """Engine requests a body becomes before `n`: a completions prompt may be a list of prompts."""
    prompt = req.get("prompt")
    if kind != "chat" and isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def choices_per_prompt(req: dict[str, Any]) -> int:
    """Sequences generated per prompt (`best_of` >= `n` generates the larger number)."""
    n, best_of = req.get("n"), req.get("best_of")
    if n is None and best_of is None:  # most requests: skip the checks
        return 1
    return max(_positive_int(n) or 1, _positive_int(best_of) or 1)


def requested_max_tokens(req: dict[str, Any]) -> int | None:
    return _positive_int(req.get("max_completion_tokens", req.get("max_tokens")))


def prompt_token_estimate(kind: str, req: dict[str, Any], parts_chars: int) -> int:
    """Input tokens of every prompt: token-id lists by length, text at ~4 characters a token.
    ``parts_chars``: the characters of `prompt_parts` (already counted by the caller), which cover
    a chat or a single prompt; only a list of prompts is walked again."""
    prompt = req.get("prompt")
    if kind == "chat" or not isinstance(prompt, list):
        est = parts_chars // 4
        return est if est > 1 else 1  # max(1, est), without the builtin's call cost (every request)
    chars = tokens = 0
    for p in prompt:
        if isinstance(p, str):
            chars += len(p)
        elif isinstance(p, list):
            tokens += len(p)
        else:  # a flat list of token ids
            tokens += 1
    return max(1, tokens + chars // 4)


def check_fan_out(kind: str, req: dict[str, Any], max_prompts: int) -> int:
    """prompts x choices, refused above ``max_prompts`` (each one is a separate engine sequence)."""
    total = prompt_count(kind, req) * choices_per_prompt(req)
    if total > max_prompts:
        raise APIError(400, f"This request asks for {total} completions (prompts x n); the gateway allows at "
                       f"most {max_prompts} per request.", param="prompt" if kind != "chat" else "n",
                       code="too_many_completions")
    return total


@dataclass(slots=True)
class PromptFacts:
    """What admission, routing and accounting read from a body, worked out once per request."""

    parts: list[str]  # `prompt_parts`: the text the prefix index hashes
    chars: int  # characters of ``parts``
    prompt_tokens: int  # `prompt_token_estimate`
    max_tokens: int | None  # `requested_max_tokens`
    fan_out: int  # `check_fan_out`: engine sequences (prompts x choices)


def prompt_facts(kind: str, req: dict[str, Any], max_prompts: int) -> PromptFacts:
    """`PromptFacts` of a parsed body; raises APIError(400) for too many completions."""
    fan_out = check_fan_out(kind, req, max_prompts)
    parts = list(prompt_parts(kind, req))
    chars = sum(map(len, parts))
    return PromptFacts(parts, chars, prompt_token_estimate(kind, req, chars), requested_max_tokens(req), fan_out)


def set_gateway_fields(req: dict[str, Any], *, model: str, salt: str, priority: int) -> None:
    """Overwrite what only the gateway may decide. `kv_transfer_params` is dropped: only the PD
    proxy sets it (pd.py), and a client's could point a decode engine at any host (SSRF)."""
    req.pop("kv_transfer_params", None)
    req["model"] = model
    req["cache_salt"] = salt
    if priority:
        req["priority"] = engine_priority(priority)
    else:
        req.pop("priority", None)


def encode_request(req: dict[str, Any]) -> bytes:
    """Serialize the (mutated) body once. orjson reads JSON nested up to 1024 levels but writes only
    254: a body in between is the client's error, not the gateway's."""
    try:
        return orjson.dumps(req)
    except orjson.JSONEncodeError as exc:
        raise APIError(400, f"The request body cannot be forwarded ({exc}); JSON nested more than 254 levels "
                       "deep is not accepted.", code="invalid_json") from None


def engine_priority(gateway_priority: int) -> int:
    """GIE: higher is more important. vLLM/inferstack engines: lower is served first."""
    return -gateway_priority
