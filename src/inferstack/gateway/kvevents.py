"""Subscribe to an engine's KV events (vLLM schema, msgpack over ZMQ PUB) and feed the precise index.

A batch is ``[ts, [event, ...], ...]``; each event is an array tagged by its first element
(``BlockStored``: hashes, parent hash, token ids, block size, lora id, medium; ``BlockRemoved``:
hashes, medium; ``AllBlocksCleared``). Maps with a ``type`` key are accepted too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from inferstack.gateway.routing.state import RoutingState

log = logging.getLogger("inferstack.gateway")


def _hashes(v: Any) -> list[bytes]:
    return [h if isinstance(h, bytes) else int(h).to_bytes(32, "big") for h in (v or [])]


def apply_batch(state: RoutingState, endpoint: str, batch: Any) -> int:
    """Apply one decoded batch to ``state.precise``; returns the number of events applied."""
    events = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else batch.get("events", [])
    n = 0
    for ev in events:
        if isinstance(ev, dict):
            kind = ev.get("type")
            fields = ev
        elif isinstance(ev, (list, tuple)) and ev:
            kind = ev[0]
            fields = None
        else:
            continue
        if kind == "BlockStored":
            hashes = fields["block_hashes"] if fields else ev[1]
            medium = (fields.get("medium") if fields else (ev[6] if len(ev) > 6 else None)) or "device"
            state.precise.stored(endpoint, _hashes(hashes), medium)
        elif kind == "BlockRemoved":
            hashes = fields["block_hashes"] if fields else ev[1]
            medium = fields.get("medium") if fields else (ev[2] if len(ev) > 2 else None)
            state.precise.removed(endpoint, _hashes(hashes), medium)
        elif kind == "AllBlocksCleared":
            state.precise.cleared(endpoint)
        else:
            continue
        n += 1
    return n


async def subscribe(ep: Any, state: RoutingState) -> None:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep.kv_events)
    try:
        while True:
            frames = await sock.recv_multipart()
            try:
                apply_batch(state, ep.id, msgpack.unpackb(frames[-1], raw=False))
            except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as exc:
                log.warning("bad KV event batch from %s: %s", ep.id, exc)
    except asyncio.CancelledError:
        raise
    finally:
        with contextlib.suppress(Exception):
            sock.close()
