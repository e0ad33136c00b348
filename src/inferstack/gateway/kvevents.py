"""Subscribe to an engine's KV events (the engine's own wire format, `engine/kv/events.py`, which is
vLLM's) over ZMQ and feed the routing state's precise prefix index."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import zmq
import zmq.asyncio

from inferstack.engine.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
)
from inferstack.gateway.routing.state import RoutingState

log = logging.getLogger("inferstack.gateway")


def apply_batch(state: RoutingState, endpoint: str, batch: KVEventBatch) -> int:
    """Apply one decoded batch to ``state.precise``; returns the number of events applied."""
    for ev in batch.events:
        if isinstance(ev, BlockStored):
            state.precise.stored(endpoint, ev.block_hashes, ev.medium or "device")
        elif isinstance(ev, BlockRemoved):
            state.precise.removed(endpoint, ev.block_hashes, ev.medium)
        elif isinstance(ev, AllBlocksCleared):
            state.precise.cleared(endpoint)
    return len(batch.events)


async def subscribe(ep: Any, state: RoutingState) -> None:
    sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep.kv_events)
    try:
        while True:
            frames = await sock.recv_multipart()
            try:
                apply_batch(state, ep.id, decode_batch(frames[-1]))
            except ValueError as exc:
                log.warning("bad KV event batch from %s: %s", ep.id, exc)
    except asyncio.CancelledError:
        raise
    finally:
        with contextlib.suppress(Exception):
            sock.close()
