"""KV cache events in vLLM's schema, msgpack-encoded on a ZMQ PUB socket.

Wire format (what vLLM's ``ZmqEventPublisher`` sends, so routers that read vLLM's events read ours):
a multipart message ``[topic, seq, payload]`` where ``seq`` is an 8-byte big-endian counter and
``payload`` is msgpack of ``[ts, [event, ...]]``. Each event is an array tagged by its class name:
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``,
``["BlockRemoved", block_hashes, medium]`` and ``["AllBlocksCleared"]``. Hashes are the 32-byte
block hashes of ``inferstack.engine.kv.hashing``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol

import msgpack

Medium = Literal["device", "host", "disk", "remote"]


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: Medium = "device"

    def to_wire(self) -> list:
        return ["BlockStored", self.block_hashes, self.parent_block_hash, self.token_ids,
                self.block_size, self.lora_id, self.medium]


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[bytes]
    medium: Medium = "device"

    def to_wire(self) -> list:
        return ["BlockRemoved", self.block_hashes, self.medium]


@dataclass(frozen=True)
class AllBlocksCleared:
    def to_wire(self) -> list:
        return ["AllBlocksCleared"]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class KVEventBatch:
    ts: float
    events: list[KVEvent]


def encode_batch(events: list[KVEvent], ts: float | None = None) -> bytes:
    return msgpack.packb([time.time() if ts is None else ts, [e.to_wire() for e in events]], use_bin_type=True)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Parse one payload; raises ValueError on anything that is not a KV event batch."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
        ts, raw_events = raw[0], raw[1]
        events: list[KVEvent] = []
        for ev in raw_events:
            tag = ev[0]
            if tag == "BlockStored":
                events.append(BlockStored(list(ev[1]), ev[2], list(ev[3]), int(ev[4]),
                                          ev[5] if len(ev) > 5 else None, ev[6] if len(ev) > 6 else "device"))
            elif tag == "BlockRemoved":
                events.append(BlockRemoved(list(ev[1]), ev[2] if len(ev) > 2 else "device"))
            elif tag == "AllBlocksCleared":
                events.append(AllBlocksCleared())
            else:
                raise ValueError(f"unknown KV event tag {tag!r}")
        return KVEventBatch(float(ts), events)
    except (msgpack.UnpackException, TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"malformed KV event batch: {exc}") from exc


class KVEventSink(Protocol):
    def publish(self, events: list[KVEvent]) -> None: ...


class ZmqEventPublisher:
    """Publishes event batches without ever blocking the engine step (PUB drops at its high-water mark)."""

    def __init__(self, endpoint: str, topic: str = "kv") -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        if endpoint.endswith(":0"):
            port = self._sock.bind_to_random_port(endpoint.rsplit(":", 1)[0])
            endpoint = f"{endpoint.rsplit(':', 1)[0]}:{port}"
        else:
            self._sock.bind(endpoint)
        self.endpoint = endpoint.replace("tcp://*", "tcp://127.0.0.1")
        self._topic = topic.encode()
        self._seq = 0

    def publish(self, events: list[KVEvent]) -> None:
        if not events:
            return
        payload = encode_batch(events)
        try:
            self._sock.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload],
                                      flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            pass  # no room: subscribers resynchronise from later batches
        self._seq += 1

    def close(self) -> None:
        self._sock.close(0)


class EventBuffer:
    """Collects the events of one engine step so they go out as one batch."""

    def __init__(self) -> None:
        self.events: list[KVEvent] = []

    def publish(self, events: list[KVEvent]) -> None:
        self.events.extend(events)

    def drain(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
