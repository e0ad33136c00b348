"""One chat completion through the OpenAI-compatible gateway: the request every model-calling node and
the agent loop share (session header, API key, error text, usage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


class ChatError(Exception):
    """The gateway did not answer with a chat completion."""


@dataclass(frozen=True)
class Gateway:
    client: httpx.AsyncClient
    url: str                   # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    api_key: str | None
    session_id: str            # X-Session-Id: the gateway keeps one run's or agent's prefixes together


@dataclass(frozen=True)
class Reply:
    message: dict[str, Any]    # choices[0].message
    finish_reason: str | None
    usage: dict[str, int]


async def chat(gw: Gateway, body: dict[str, Any]) -> Reply:
    headers = {"X-Session-Id": gw.session_id} if gw.session_id else {}
    if gw.api_key:
        headers["Authorization"] = f"Bearer {gw.api_key}"
    try:
        resp = await gw.client.post(gw.url.rstrip("/") + "/chat/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise ChatError(f"gateway {gw.url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise ChatError(f"gateway answered {resp.status_code}: {resp.text[:300]}")
    try:
        reply = resp.json()
        choice = reply["choices"][0]
        usage = {k: int(v) for k, v in (reply.get("usage") or {}).items() if isinstance(v, int)}
        message = dict(choice["message"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ChatError(f"the gateway's reply is not a chat completion: {resp.text[:300]}") from None
    return Reply(message, choice.get("finish_reason"), usage)
