"""The request body's limits, read through ASGI ``receive``: 413 past a byte cap, 408 past a deadline.

The header block's limits (431, 408) and the client-gone future are the HTTP front's
(`protocol/http_front.py`); `guarded_protocol` and `CLIENT_GONE` are re-exported from there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from inferstack.protocol.errors import APIError
from inferstack.protocol.http_front import BODY_NOW, CLIENT_GONE, guarded_protocol
from inferstack.protocol.http_limits import BODY_TIMEOUT_S

__all__ = ["BODY_NOW", "CLIENT_GONE", "guarded_protocol", "read_asgi_body", "read_body_within"]


class _Deadline:
    """Cancel the current task after ``timeout_s`` unless `done` is called first: `asyncio.timeout`'s
    job at a third of its cost (one timer handle), which matters because every request's body is read
    under one. `expired` says, after a CancelledError, whether it came from this deadline."""

    __slots__ = ("_cancelling", "_handle", "_task", "fired")

    def __init__(self, timeout_s: float, task: asyncio.Task | None = None) -> None:
        task = task or asyncio.current_task()
        assert task is not None
        self._task, self._cancelling, self.fired = task, task.cancelling(), False
        self._handle = task.get_loop().call_later(timeout_s, self._fire)  # no second loop lookup

    def _fire(self) -> None:
        self.fired = True
        self._task.cancel()

    def done(self) -> None:
        self._handle.cancel()

    def expired(self) -> bool:
        """The cancellation was ours and nobody else's (then it is taken back, as `asyncio.timeout` does)."""
        return self.fired and self._task.uncancel() <= self._cancelling


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds the limit of {limit} bytes.", code="body_too_large")


def _too_slow(timeout_s: float) -> APIError:
    return APIError(408, f"The request body did not arrive within {timeout_s:g} s.", code="body_timeout",
                    headers={"Connection": "close"})


async def read_body_within(chunks: AsyncIterator[bytes], limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The whole body from an ASGI chunk stream: 413 past `limit` bytes, 408 past `timeout_s` seconds
    (`read_asgi_body` over the stream's chunks, so both readers share one set of rules)."""
    stream = chunks.__aiter__()

    async def receive() -> dict:
        try:
            return {"type": "http.request", "body": await stream.__anext__(), "more_body": True}
        except StopAsyncIteration:
            return {"type": "http.request", "body": b"", "more_body": False}

    return await read_asgi_body(receive, limit, timeout_s)


def body_at_hand(body_now: Callable[[], bytes | None], limit: int) -> bytes | None:
    """The whole body from our front's `BODY_NOW` extension when it is already in (413 past ``limit``), with no
    coroutine at all; None: read it with `read_asgi_body`."""
    whole = body_now()
    if whole is not None and len(whole) > limit:
        raise _too_large(limit)
    return whole


async def read_asgi_body(receive: Callable[[], Awaitable[dict]], limit: int,
                         timeout_s: float = BODY_TIMEOUT_S, task: asyncio.Task | None = None,
                         body_now: Callable[[], bytes | None] | None = None) -> bytes:
    """The request body straight from ASGI ``receive`` (no iterator in between: the gateway reads every
    request's body here; the engine's `read_body_within` goes through it too): 413 past `limit` bytes, 408 past
    `timeout_s` seconds, a disconnect while reading is APIError(499). ``task``: the current task, when the
    caller has it (looking it up costs a getpid system call on Python 3.11). ``body_now``: our front's
    `BODY_NOW` extension, which hands over a body already complete with no wait (so no deadline either)."""
    if body_now is not None and (whole := body_at_hand(body_now, limit)) is not None:
        return whole
    parts: list[bytes] = []
    size = 0
    deadline = _Deadline(timeout_s, task)
    try:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise APIError(499, "Client disconnected.")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            if not msg.get("more_body"):
                break
            parts.append(chunk)
    except asyncio.CancelledError:
        if deadline.expired():
            raise _too_slow(timeout_s) from None
        raise
    finally:
        deadline.done()
    if parts:
        parts.append(chunk)
        return b"".join(parts)
    return chunk
